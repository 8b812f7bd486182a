"""Causal LM -> Core ML ML Program (.mlpackage) with its KV cache as Core ML state, as Apple's "On Device Llama 3.1
with Core ML" recipe builds it: traced from transformers through a small wrapper, fp16 compute, weights compressed
by coremltools.optimize as the quantization asks.

Two shapes, chosen by the target's compute unit:
- GPU/CPU (`unit = "gpu"`): one function whose query length and attended length are flexible (RangeDim), so one
  model runs prefill chunks and single-token decode.
- Neural Engine (`unit = "npu"`): the ANE runs static shapes only, so the package holds two functions over the
  same weights and state, `prefill` (PREFILL_CHUNK tokens) and `decode` (one token), both attending over the whole
  fixed-length cache behind a mask.

Off macOS the package cannot predict; it is checked by structure and by its weights read back (see parity).
"""

import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

logging.getLogger("coremltools").setLevel(logging.ERROR)  # off macOS it warns at import that it cannot predict

import coremltools as ct  # noqa: E402
import coremltools.optimize.coreml as cto  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as load_mil  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv  # noqa: E402

from edgeport import quantization  # noqa: E402
from edgeport.convert import Artifact  # noqa: E402
from edgeport.errors import EdgeportError  # noqa: E402
from edgeport.plan import Step  # noqa: E402
from edgeport.source import Source  # noqa: E402
from edgeport.targets import Target  # noqa: E402

PREFILL_CHUNK = 64  # tokens per prefill call of the Neural Engine shape
DEPLOYMENT_TARGETS = {"iOS18": ct.target.iOS18, "macOS15": ct.target.macOS15}  # states need iOS 18 / macOS 15
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
COMPRESSED_OPS = ("linear", "gather")  # the matrices: projections, output head and embedding; norms stay fp16
MIN_WEIGHTS = 256  # coremltools' default threshold (2048 elements) would leave small models' projections in fp16


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write `source` as `dest/model.mlpackage` (dest must not exist) with the tokenizer files beside it."""
    if source.family != "causal-lm":
        raise EdgeportError(f"{source.ref}: the Core ML converter handles causal LMs, not {source.model_type}")
    quant = quantization.get(step.quantization, "coreml")
    deployment = target.coreml_deployment
    if deployment not in DEPLOYMENT_TARGETS:
        raise EdgeportError(
            f"{target.name}: Core ML deployment target {deployment} is not supported; the KV cache as state needs "
            f"one of {', '.join(DEPLOYMENT_TARGETS)}"
        )
    neural_engine = step.unit == "npu"
    AttentionInterface.register("edgeport_fused_sdpa", fused_sdpa)
    model = source.load_reference(attn_implementation="edgeport_fused_sdpa")  # float32; Core ML computes in fp16
    context = target.context_length
    dest.mkdir()
    package = dest / "model.mlpackage"
    with tempfile.TemporaryDirectory(prefix="edgeport-coreml-") as tmp, _quiet():
        if neural_engine:
            descriptor = ct.utils.MultiFunctionDescriptor()
            for name, width in (("prefill", PREFILL_CHUNK), ("decode", 1)):
                part = Path(tmp) / f"{name}.mlpackage"
                _compress(_convert(model, context, width, deployment), quant).save(str(part))
                descriptor.add_function(str(part), src_function_name="main", target_function_name=name)
            descriptor.default_function_name = "decode"
            ct.utils.save_multifunction(descriptor, str(package))
        else:
            _compress(_convert(model, context, None, deployment), quant).save(str(package))
    for name in TOKENIZER_FILES:
        if (source.path / name).exists():
            shutil.copy2(source.path / name, dest / name)
    runtime = {
        "compute_units": "CPU_AND_NE" if neural_engine else "CPU_AND_GPU",
        "prefill_chunk": PREFILL_CHUNK if neural_engine else None,
        "context_length": context,
    }
    (dest / "coreml.json").write_text(json.dumps(runtime, indent=2))  # what a runner needs beside the package
    details = {
        "deployment_target": deployment,
        **runtime,
        **describe(package),
    }
    return Artifact("coreml", quant.name, dest, f"coremltools {ct.__version__}", details)


def fused_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention as one torch SDPA call that coremltools lowers to Core ML's fused
    scaled_dot_product_attention (iOS 18): it does so only when no explicit scale is passed, and
    1/sqrt(head_dim), the default, is the scale Llama-style models use."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key.to(query.dtype), groups), repeat_kv(value.to(query.dtype), groups)  # the cache is fp16
    default = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-6
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=None if default else scaling
    )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _quiet():
    """coremltools' progress bars and the tracer's warnings would bury edgeport's own progress line."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


class _SliceCache:
    """What transformers' attention asks of a cache, over the wrapper's state: the new keys and values are written
    in place at `position`, and the first `end` positions are read back."""

    def __init__(self, keys, values, position, end):
        self.keys, self.values, self.position, self.end = keys, values, position, end

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        width = key_states.shape[-2]
        self.keys[layer_idx, :, :, self.position : self.position + width, :] = key_states.to(self.keys.dtype)
        self.values[layer_idx, :, :, self.position : self.position + width, :] = value_states.to(self.values.dtype)
        return self.keys[layer_idx, :, :, : self.end, :], self.values[layer_idx, :, :, : self.end, :]

    def get_seq_length(self, layer_idx=0):
        return self.position


class StatefulCausalLM(torch.nn.Module):
    """input_ids [1, q], causal_mask [1, 1, q, end] (additive: 0 where a token may attend, -inf elsewhere) and
    position [1] (tokens already in the cache) -> logits [1, q, vocab]; keyCache and valueCache are Core ML state."""

    def __init__(self, model, context_length: int):
        super().__init__()
        self.model = model
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        shape = (config.num_hidden_layers, 1, kv_heads, context_length, head_dim)
        self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, input_ids, causal_mask, position):
        width, end = input_ids.shape[-1], causal_mask.shape[-1]
        past = position[0]
        cache = _SliceCache(self.keyCache, self.valueCache, past, end)
        position_ids = (torch.arange(width) + past).unsqueeze(0)
        return self.model(
            input_ids=input_ids,
            attention_mask=causal_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).logits


def _convert(model, context: int, width: int | None, deployment: str):
    """Trace and convert; `width` None is the flexible shape, else a static one over the whole cache."""
    wrapper = StatefulCausalLM(model, context).eval()
    example_width = width or 2
    example = (
        torch.zeros(1, example_width, dtype=torch.int32),
        torch.zeros(1, 1, example_width, context if width else example_width + 1),
        torch.tensor([context - example_width if width else 1], dtype=torch.int32),
    )
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    if width:
        query, attended = width, context
    else:
        query, attended = ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1)
    state_type = ct.TensorType(shape=tuple(wrapper.keyCache.shape), dtype=np.float16)
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType("input_ids", shape=(1, query), dtype=np.int32),
            ct.TensorType("causal_mask", shape=(1, 1, query, attended), dtype=np.float16),
            ct.TensorType("position", shape=(1,), dtype=np.int32),
        ],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        states=[ct.StateType(state_type, name="keyCache"), ct.StateType(state_type, name="valueCache")],
        minimum_deployment_target=DEPLOYMENT_TARGETS[deployment],
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,  # loading compiles the model, which only macOS can
    )


def _compress(mlmodel, quant):
    if quant.is_float:
        return mlmodel
    if quant.name == "palettize4":
        op = cto.OpPalettizerConfig(
            nbits=4, mode="kmeans", granularity="per_grouped_channel", group_size=16, weight_threshold=MIN_WEIGHTS
        )
        compress = cto.palettize_weights
    else:
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype=f"int{quant.bits}",
            granularity="per_block" if quant.group_size else "per_channel",
            block_size=quant.group_size or 32,
            weight_threshold=MIN_WEIGHTS,
        )
        compress = cto.linear_quantize_weights
    config = cto.OptimizationConfig(op_type_configs={name: op for name in COMPRESSED_OPS})
    return compress(mlmodel, config)


def describe(package: Path) -> dict:
    """The saved package as a reader finds it: its interface, and every weight matrix by how it is stored (for one
    function: a multifunction package's functions share their weights)."""
    description = ct.models.MLModel(str(package), skip_model_load=True).get_spec().description

    def features(items) -> list[dict]:
        found = []
        for item in items:
            kind = item.type.WhichOneof("Type")
            array = item.type.stateType.arrayType if kind == "stateType" else item.type.multiArrayType
            ranges = array.shapeRange.sizeRanges
            if ranges:
                shape = [
                    r.lowerBound if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}" for r in ranges
                ]
            else:
                shape = [int(d) for d in array.shape]
            found.append({"name": item.name, "shape": shape})
        return found

    if description.functions:
        interface = {
            f.name: {"inputs": features(f.input), "outputs": features(f.output), "states": features(f.state)}
            for f in description.functions
        }
    else:
        interface = {
            "main": {
                "inputs": features(description.input),
                "outputs": features(description.output),
                "states": features(description.state),
            }
        }
    function = next(iter(_program(package).functions.values()))
    ops = Counter(op.op_type for op in function.operations)
    packed = {v.name for op in function.operations if op.op_type.startswith("constexpr_") for v in op.inputs.values()}
    weights = Counter()
    for op in function.operations:
        if op.op_type.startswith("constexpr_"):
            weights[op.op_type] += 1
        elif op.op_type == "const" and op.outputs[0].rank >= 2 and op.outputs[0].name not in packed:
            weights[f"const {op.outputs[0].dtype.__name__}"] += 1
    return {
        "functions": interface,
        "weight_matrices_by_storage": dict(weights),
        "sdpa_ops": ops.get("scaled_dot_product_attention", 0),
        "ops": sum(ops.values()),
    }


def read_weights(package: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The package's weights as float arrays (compressed ones decompressed), keyed by the transformers parameter
    names they came from. The converter names each weight after its parameter, dots made underscores; vectors
    folded into other ops (norm scales) keep no name and are not found."""
    by_name = {"model_" + name.replace(".", "_"): name for name in names}
    found = {}
    for function in _program(package).functions.values():
        for op in function.operations:
            if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
                continue
            stem = re.sub(r"(_promoted)?(_to_fp16)?(_quantized|_palettized)?$", "", op.name)
            if stem in by_name and by_name[stem] not in found:
                value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
                found[by_name[stem]] = np.asarray(value, dtype=np.float32)
    return found


def _program(package: Path):
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return load_mil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
