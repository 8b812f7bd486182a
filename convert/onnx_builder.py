"""onnxruntime-genai's model builder with its int4 pass done one weight at a time.

Run as `python -m edgeport.convert.onnx_builder <the builder's own arguments>`.

The builder quantizes by serializing the whole graph, every weight in float32, into one protobuf for onnxruntime's
MatMulNBitsQuantizer: 10.5 GB at its peak for Llama-3.2-1B (4.3x its bf16 weights), more than an 8B model can have
on the machines it is converted on. Here the same quantizer (onnxruntime's DefaultWeightOnlyQuantizer, configured as
the builder configures it) is given one weight at a time, largest first, a MatMul's a slice of its columns at a
time, and its node takes the float MatMul's place before the next weight is read; the checkpoint's pages that
reading made resident are handed back as it goes. The graph and the weights written are the builder's own, byte for
byte (a test compares them). Where the builder is asked for what this pass does not cover (QDQ, another algorithm,
per-node bits), its own pass runs.
"""

import gc

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path, as `-m` would)
from builders.base import Model  # the builder's own module names; pyproject pins the builder this pass is tested on
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
    QuantFormat,
)

from edgeport.machine import page_out_checkpoints

_builders_own_pass = Model.to_nbits
SLICE_COLUMNS = 4096  # a MatMul's output columns quantized at a time


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
    """Quantize this node's weight, then put the quantizer's node and initializers in its place."""
    weight = _weight(node)
    proto, quantized = _quantized(node, weight, quantizer)
    given = {value.name: value for value in node.inputs if value is not None}
    added = {}
    for name, array in quantized.items():
        const = ir.tensor(array, name=name)
        added[name] = ir.Value(name=name, shape=const.shape, type=ir.TensorType(const.dtype), const_value=const)
        graph.register_initializer(added[name])
    inputs = [added[name] if name in added else given[name] for name in proto.input]
    attributes = ir.convenience.convert_attributes(
        {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
    )
    quantized = ir.Node(proto.domain, proto.op_type, inputs, attributes, num_outputs=1, name=proto.name)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [quantized], node.outputs, quantized.outputs)
    if not weight.uses():
        graph.initializers.pop(weight.name)
    gc.collect()


def _quantized(node: ir.Node, weight: ir.Value, quantizer) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """The quantizer's node and its new initializers, for a graph that holds only this node's weight.

    A MatMul's weight [K, N] is given SLICE_COLUMNS output columns at a time: MatMulNBits quantizes each column's
    blocks on their own, so the slices' arrays, stacked, are the whole weight's. The quantizer makes four float
    copies of what it is given (4.6 GB for Llama-3.2-1B's output projection, given whole); here only the float
    weight is whole.
    """
    floats = weight.const_value.numpy()
    page_out_checkpoints()  # read into the float copy
    if node.op_type == "MatMul":
        parts = [floats[:, start : start + SLICE_COLUMNS] for start in range(0, floats.shape[1], SLICE_COLUMNS)]
    else:
        parts = [floats]
    slices = []
    for part in parts:
        alone = onnx.GraphProto(initializer=[ir.serde.serialize_tensor(ir.tensor(part, name=weight.name))])
        (proto,) = quantizer.quantize(ir.serde.serialize_node(node), [alone])
        # Copies: a view would keep the whole message, the float slice with it, alive.
        slices.append(
            {t.name: onnx.numpy_helper.to_array(t).copy() for t in alone.initializer if t.name != weight.name}
        )
        del alone
    if len(slices) > 1:
        next(a for a in proto.attribute if a.name == "N").i = floats.shape[1]
    return proto, {name: np.concatenate([arrays[name] for arrays in slices]) for name in slices[0]}


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
    page_out_checkpoints()  # what building the graph read (Llama-3.2-3B: 1.0 GB, its fused attention weights')
    # Largest first: the output projection's float copy comes while the fewest quantized weights are held.
    for node in sorted(nodes, key=lambda node: _weight(node).const_value.size, reverse=True):
        _quantize_node(graph, node, quantizer)
    self.model.opset_imports.setdefault("com.microsoft", 1)
    return self.model


def main() -> None:
    import runpy

    Model.to_nbits = to_nbits_a_weight_at_a_time
    runpy.run_module("builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
