"""onnxruntime-genai's model builder with its int4 pass done one weight at a time.

Run as `python -m edgeport.convert.onnx_builder <the builder's own arguments>`.

The builder quantizes by serializing the whole graph, every weight in float32, into one protobuf for onnxruntime's
MatMulNBitsQuantizer: 10.5 GB at its peak for Llama-3.2-1B (4.3x its bf16 weights), more than an 8B model can have
on the machines it is converted on. Here the same quantizer (onnxruntime's DefaultWeightOnlyQuantizer, configured as
the builder configures it) is given one weight at a time, largest first, and its node takes the float MatMul's place
before the next weight is read; the checkpoint's pages that reading made resident are handed back as it goes. The
graph and the weights written are the builder's own, byte for byte (a test compares them). Where the builder is
asked for what this pass does not cover (QDQ, another algorithm, per-node bits), its own pass runs.
"""

import ctypes
import gc
import sys

import onnx
import onnx_ir as ir
import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path, as `-m` would)
from builders.base import Model  # the builder's own module names; pyproject pins the builder this pass is tested on
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
    QuantFormat,
)

_builders_own_pass = Model.to_nbits


def _is_plain(model: Model) -> bool:
    """The builder's common case: MatMulNBits in QOperator form, the default algorithm, one bit width."""
    return not (
        model.quant_attrs["use_qdq"]
        or getattr(model, "quantization_algo", "default") != "default"
        or getattr(model, "int4_customized_weight_config", None)
        or getattr(model, "exact_quant_overrides", None)
        or getattr(model, "exact_quant_override_names", None)
        or model.matmul_attrs.get("weights_prepacked")
    )


def _quantizer(model: Model) -> DefaultWeightOnlyQuantizer:
    attrs = model.quant_attrs
    return DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(
            block_size=attrs["matmul_block_size"],
            is_symmetric=attrs["is_symmetric"],
            accuracy_level=attrs["accuracy_level"],
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=tuple(attrs["op_types_to_quantize"]),
            bits=attrs["bits"],
        )
    )


def _quantize_node(graph: ir.Graph, node: ir.Node, quantizer: DefaultWeightOnlyQuantizer) -> None:
    """Give the quantizer a graph holding only this node's weight, then put its node and initializers in place."""
    weight = _weight(node)
    alone = onnx.GraphProto(initializer=[ir.serde.serialize_tensor(weight.const_value)])
    (proto,) = quantizer.quantize(ir.serde.serialize_node(node), [alone])  # one node, for a 2-D weight
    given = {value.name: value for value in node.inputs if value is not None}
    added = {}
    for tensor in alone.initializer:
        if tensor.name != weight.name:
            # A copy: a view would keep the whole message, the float weight with it, alive.
            const = ir.tensor(onnx.numpy_helper.to_array(tensor).copy(), name=tensor.name)
            added[tensor.name] = ir.Value(
                name=tensor.name, shape=const.shape, type=ir.TensorType(const.dtype), const_value=const
            )
            graph.register_initializer(added[tensor.name])
    del alone, tensor
    inputs = [added[name] if name in added else given[name] for name in proto.input]
    attributes = ir.convenience.convert_attributes(
        {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
    )
    quantized = ir.Node(proto.domain, proto.op_type, inputs, attributes, num_outputs=1, name=proto.name)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [quantized], node.outputs, quantized.outputs)
    if not weight.uses():
        graph.initializers.pop(weight.name)
    gc.collect()
    _page_out_the_source()


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now, as memory pressure would; contents are unchanged


def _page_out_the_source() -> None:
    """Hand back the pages of the memory-mapped checkpoint that reading weights made resident.

    transformers maps each safetensors file and keeps it mapped while any of its tensors lives, so every page a
    weight was read from stays counted in this process until the end: the whole source by the last layer. Those
    pages are clean copies of the file; paging them out changes nothing a later read sees (it reads the file again).
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                libc.madvise(start, end - start, _MADV_PAGEOUT)  # an older kernel refuses it: nothing is lost


def _weight(node: ir.Node) -> ir.Value | None:
    """The node's constant weight, if it has one."""
    weight = node.inputs[0 if node.op_type == "Gather" else 1]
    return weight if weight is not None and weight.const_value is not None else None


def to_nbits_a_weight_at_a_time(self: Model) -> ir.Model:
    graph = self.model.graph
    excluded = set(self.quant_attrs["nodes_to_exclude"])
    types = set(self.quant_attrs["op_types_to_quantize"])
    nodes = [node for node in graph if node.op_type in types and node.name not in excluded and _weight(node)]
    if not _is_plain(self) or any(len(_weight(node).shape) != 2 for node in nodes):
        return _builders_own_pass(self)
    quantizer = _quantizer(self)
    # Largest first: the output projection's float copies come while the fewest source pages are resident.
    for node in sorted(nodes, key=lambda node: _weight(node).const_value.size, reverse=True):
        _quantize_node(graph, node, quantizer)
    self.model.opset_imports.setdefault("com.microsoft", 1)
    return self.model


if __name__ == "__main__":
    import runpy

    Model.to_nbits = to_nbits_a_weight_at_a_time
    runpy.run_module("builder", run_name="__main__", alter_sys=True)
