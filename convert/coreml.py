"""Causal LM -> Core ML ML Programs (.mlpackage) with the KV cache as Core ML state, as Apple's "On Device Llama 3.1
with Core ML" recipe builds them: traced from transformers through a small wrapper, fp16 compute, weights compressed
by coremltools.optimize as the quantization asks.

The model is built in chunks of consecutive layers, one package each, as the community's Core ML LLM exports are:
the Neural Engine compiles only packages of limited size (the target's `coreml_chunk_gb`), and converting a chunk
holds only its own weights, read from the source a block at a time (at most PART_PARAMS parameters), so that an 8B
model converts within the memory of the machine that converts it. The first chunk holds the embedding, the last the
final norm and the output projection; the hidden states pass from one to the next in fp16 (`coreml.json` lists them).

Two shapes, chosen by the target's compute unit:
- GPU/CPU (`unit = "gpu"`): one function whose query length and attended length are flexible (RangeDim), so one
  model runs prefill chunks and single-token decode.
- Neural Engine (`unit = "npu"`): the ANE runs static shapes only, so each package holds two functions over the
  same weights and state, `prefill` (ANE_PREFILL_CHUNK tokens) and `decode` (one token), both attending over the
  whole fixed-length cache behind a mask.
Before iOS 18 / macOS 15 (the target's `coreml_deployment`) there is no state and no multifunction package: one
flexible function takes the caches as inputs and returns the updated ones.

Off macOS the packages cannot predict; they are checked by structure and by their weights read back (see parity).
"""

import importlib
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from edgeport.engines.coreml import coremltools, describe

ct = coremltools()  # quietly: off macOS it warns at import that it cannot predict
import coremltools.optimize.coreml as cto  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_registry import register_pass  # noqa: E402
from coremltools.optimize.coreml import _quantization_passes  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv  # noqa: E402

from edgeport import quantization  # noqa: E402
from edgeport.convert import Artifact, copy_app_files  # noqa: E402
from edgeport.engines.reference import part_forward, part_of, running_only  # noqa: E402
from edgeport.errors import EdgeportError  # noqa: E402
from edgeport.families.causal_lm import PART_PARAMS, LayerSpan  # noqa: E402
from edgeport.layouts import ANE_PREFILL_CHUNK, CoreMLChunk, CoreMLModel  # noqa: E402
from edgeport.machine import page_out_checkpoints, release_freed_memory  # noqa: E402
from edgeport.plan import GB, Step  # noqa: E402
from edgeport.quiet import converting  # noqa: E402
from edgeport.source import Source  # noqa: E402
from edgeport.targets import Target  # noqa: E402

DEPLOYMENT_TARGETS = {
    "iOS17": ct.target.iOS17,
    "macOS14": ct.target.macOS14,
    "iOS18": ct.target.iOS18,
    "macOS15": ct.target.macOS15,
}
WITH_STATE = {"iOS18", "macOS15"}  # Core ML state, fused SDPA, int4 blocks and multifunction packages start here
COMPRESSED_OPS = ("linear", "gather")  # the matrices: projections, output head and embedding; norms stay fp16
MIN_WEIGHTS = 256  # coremltools' default threshold (2048 elements) would leave small models' projections in fp16
ATTENTION = "edgeport_fused_sdpa"


def convert(source: Source, step: Step, target: Target, dest: Path) -> Artifact:
    """Write `source` as `dest/model-NN-of-NN.mlpackage` chunks (dest must not exist) with the tokenizer files."""
    quant = quantization.get(step.quantization, "coreml")
    deployment, stateful = deployment_of(target, quant)
    neural_engine = step.unit == "npu" and stateful  # static prefill/decode functions need a multifunction package
    AttentionInterface.register(ATTENTION, fused_sdpa)
    spans = chunk_spans(source, quant, target)
    layout = CoreMLModel(
        compute_units="CPU_AND_NE" if neural_engine else "CPU_AND_GPU",
        prefill_chunk=ANE_PREFILL_CHUNK if neural_engine else None,
        context_length=target.context_length,
        kv_cache="state" if stateful else "inputs and outputs",
        cache_shape=list(source.family.dims(source.config).cache_shape(target.context_length)),
        chunks=[
            CoreMLChunk(f"model-{i + 1:02d}-of-{len(spans):02d}.mlpackage", span.start, span.stop)
            for i, span in enumerate(spans)
        ],
    )
    dest.mkdir()
    whole = None  # the source read whole, where its checkpoint cannot be read a block at a time
    with tempfile.TemporaryDirectory(prefix="edgeport-coreml-") as tmp, converting():
        for chunk in layout.chunks:
            model = _chunk_weights(source, chunk)
            if model is None:
                whole = whole or in_half(source.load_reference(attn_implementation=ATTENTION))
                model = whole
            package = dest / chunk.package
            if neural_engine:
                descriptor = ct.utils.MultiFunctionDescriptor()
                for name, width in (("prefill", ANE_PREFILL_CHUNK), ("decode", 1)):
                    part = Path(tmp) / f"{name}.mlpackage"
                    _convert(model, chunk, layout, width, deployment, quant).save(str(part))
                    descriptor.add_function(str(part), src_function_name="main", target_function_name=name)
                descriptor.default_function_name = "decode"
                with _lean_weight_sharing():
                    ct.utils.save_multifunction(descriptor, str(package))
            else:
                _convert(model, chunk, layout, None, deployment, quant).save(str(package))
            del model
            release_freed_memory()  # a chunk's leftovers go before the next chunk is read
    copy_app_files(source.path, dest)
    layout.write(dest)
    packages = {chunk.package: describe(dest / chunk.package) for chunk in layout.chunks}
    storage = sum((Counter(p["weight_matrices_by_storage"]) for p in packages.values()), Counter())
    details = {
        "deployment_target": deployment,
        **asdict(layout),
        "weight_matrices_by_storage": dict(storage),
        "sdpa_ops": sum(p["sdpa_ops"] for p in packages.values()),
        "packages": packages,
    }
    return Artifact("coreml", quant.name, dest, f"coremltools {ct.__version__}", layout, details)


def chunk_spans(source: Source, quant, target: Target) -> list[LayerSpan]:
    """The layers of each chunk: as few chunks as keep each within the target's package size (its weights as
    stored) and within PART_PARAMS parameters."""
    bound = PART_PARAMS
    if target.coreml_chunk_gb:
        bits = quant.bits_per_weight()
        bound = min(bound, target.coreml_chunk_gb * GB * 8 / bits)
    return source.family.parts(source.config, bound)


def _chunk_weights(source: Source, chunk: CoreMLChunk):
    """The source's model with only `chunk`'s blocks read, its matrices in fp16 (read so: a float32 copy of a chunk
    first would double what it holds); None where the checkpoint cannot be read a block at a time."""
    model = part_of(source, chunk.first_layer, chunk.end_layer, matrices=torch.float16, attn_implementation=ATTENTION)
    return model and in_half(model)


@contextmanager
def _lean_weight_sharing():
    """coremltools' save_multifunction, which finds the weights its functions share with np.allclose: on two equal
    int4 arrays that compares float64 copies of both, 7.2 GB more for a chunk with Llama-3.2-1B's 262M-parameter
    embedding (the arrays themselves: 0.26 GB each). The same comparison, a million values at a time."""
    module = importlib.import_module("coremltools.converters.mil.mil.passes.defs.cleanup.const_deduplication")
    original = module.np
    module.np = _ChunkedAllclose(original)
    try:
        yield
    finally:
        module.np = original


class _ChunkedAllclose:
    """numpy, but for allclose, which compares same-shaped arrays a slice at a time (broadcasting ones whole)."""

    SLICE = 1 << 20

    def __init__(self, numpy):
        self.numpy = numpy

    def __getattr__(self, name):
        return getattr(self.numpy, name)

    def allclose(self, a, b, rtol=1e-05, atol=1e-08, equal_nan=False) -> bool:
        a, b = self.numpy.asarray(a), self.numpy.asarray(b)
        if a.shape != b.shape:
            return self.numpy.allclose(a, b, rtol, atol, equal_nan)
        a, b = a.reshape(-1), b.reshape(-1)
        return all(
            self.numpy.allclose(a[i : i + self.SLICE], b[i : i + self.SLICE], rtol, atol, equal_nan)
            for i in range(0, a.size, self.SLICE)
        )


def in_half(model, keep: tuple = ()):
    """`model` with every matrix it holds (linear layers, embeddings; not the modules in `keep`) in fp16, computed
    in fp16 and handing float32 on, and every other weight in float32. coremltools then converts them as they are:
    given float32 matrices, its passes hold several copies of each (9.7 GB to convert Llama-3's 1 GB output
    projection, against 1.9 GB in fp16). The program is the same, since it computes in fp16."""
    for module in model.modules():
        matrix = isinstance(module, torch.nn.Linear | torch.nn.Embedding) and not any(module is k for k in keep)
        if matrix and module.weight.device.type != "meta":
            module.to(torch.float16)
            module.register_forward_pre_hook(lambda _, args: tuple(_half(a) for a in args))
            module.register_forward_hook(lambda _, args, out: out.float())
        elif not matrix:
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                if tensor.is_floating_point() and tensor.device.type != "meta":
                    tensor.data = tensor.data.float()
    return model


def _half(value):
    return value.half() if torch.is_tensor(value) and value.is_floating_point() else value


def deployment_of(target: Target, quant) -> tuple[str, bool]:
    """The oldest OS the target's apps ship to, and whether it has Core ML state (and int4 blocks)."""
    deployment = target.coreml_deployment or "iOS18"
    if deployment not in DEPLOYMENT_TARGETS:
        raise EdgeportError(
            f"{target.name}: coreml_deployment {deployment} is not one of {', '.join(DEPLOYMENT_TARGETS)}"
        )
    stateful = deployment in WITH_STATE
    if not stateful and quant.group_size:
        raise EdgeportError(
            f"{target.name}: {quant.name} needs iOS 18 / macOS 15 and the target deploys to {deployment}; "
            "use --quant int8-channel or palettize4"
        )
    return deployment, stateful


def fused_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention as one torch SDPA call that coremltools lowers to Core ML's fused
    scaled_dot_product_attention (iOS 18): it does so only when no explicit scale is passed, and
    1/sqrt(head_dim), the default, is the scale Llama-style models use."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key.to(query.dtype), groups), repeat_kv(value.to(query.dtype), groups)  # the cache is fp16
    default = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-6
    causal = attention_mask is None and query.shape[2] > 1  # no mask given: transformers leaves causality to us
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, is_causal=causal, scale=None if default else scaling
    )
    return out.transpose(1, 2).contiguous(), None


class _SliceCache:
    """What transformers' attention asks of a cache, over the wrapper's caches: the new keys and values go in at
    `position` and the first `end` positions are read back. Over Core ML state the write is in place; over caches
    passed in (before iOS 18) each layer's cache is rebuilt around the new entries, which converts without the
    index tensors an in-place write to an input would need. A chunk's caches hold its own layers, from `first`."""

    def __init__(self, keys, values, position, end, in_place: bool, first: int = 0):
        self.keys, self.values, self.position, self.end, self.in_place = keys, values, position, end, in_place
        self.first = first
        self.updated: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        new, layer_idx = [], layer_idx - self.first
        for cache, states in ((self.keys, key_states), (self.values, value_states)):
            start, stop = self.position, self.position + states.shape[-2]
            if self.in_place:
                cache[layer_idx, :, :, start:stop, :] = states.to(cache.dtype)
                new.append(cache[layer_idx])
            else:
                layer = cache[layer_idx]
                new.append(torch.cat([layer[:, :, :start], states.to(cache.dtype), layer[:, :, stop:]], dim=-2))
        self.updated[layer_idx] = tuple(new)
        return new[0][:, :, : self.end, :], new[1][:, :, : self.end, :]

    def get_seq_length(self, layer_idx=0):
        return self.position


class StatefulCausalLM(torch.nn.Module):
    """One chunk: input_ids [1, q] (the first chunk) or hidden_states [1, q, hidden], causal_mask [1, 1, q, end]
    (additive: 0 where a token may attend, -inf elsewhere) and position [1] (tokens already in the cache) -> logits
    [1, q, vocab] (the last chunk) or the hidden states after its layers; keyCache and valueCache (the chunk's
    layers) are Core ML state. Before iOS 18 / macOS 15 there is no state: the caches are passed in and the updated
    ones returned. A model in one chunk is the whole model, input_ids to logits."""

    def __init__(self, model, cache_shape: tuple[int, ...], first_layer: int = 0, last: bool = True):
        super().__init__()
        self.model, self.first_layer, self.last = model, first_layer, last
        shape = cache_shape  # layers, batch, KV heads, context, head dim
        self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, inputs, causal_mask, position, key_cache=None, value_cache=None):
        width, end = inputs.shape[1], causal_mask.shape[-1]
        past = position[0]
        stateless = key_cache is not None
        keys, values = (key_cache, value_cache) if stateless else (self.keyCache, self.valueCache)
        cache = _SliceCache(keys, values, past, end, not stateless, self.first_layer)
        out = part_forward(
            self.model,
            inputs,
            self.last,
            cache,
            attention_mask=causal_mask,
            position_ids=(torch.arange(width) + past).unsqueeze(0),
            use_cache=True,
        )
        if not stateless:
            return out
        layers = [cache.updated[i] for i in range(len(cache.updated))]
        return out, torch.stack([k for k, _ in layers]), torch.stack([v for _, v in layers])


def _convert(model, chunk: CoreMLChunk, layout: CoreMLModel, width: int | None, deployment: str, quant):
    """Trace and convert one chunk; `width` None is the flexible shape, else a static one over the whole cache."""
    context, last_layer = layout.context_length, layout.cache_shape[0]
    first, last = chunk.first_layer == 0, chunk.end_layer == last_layer
    hidden = model.config.get_text_config().hidden_size
    stateful = deployment in WITH_STATE
    example_width = width or 2
    if width:
        query, attended = width, context
    else:
        query, attended = ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1)
    if first:
        example = (torch.zeros(1, example_width, dtype=torch.int32),)
        inputs = [ct.TensorType("input_ids", shape=(1, query), dtype=np.int32)]
    else:
        example = (torch.zeros(1, example_width, hidden),)
        inputs = [ct.TensorType("hidden_states", shape=(1, query, hidden), dtype=np.float16)]
    example += (
        torch.zeros(1, 1, example_width, context if width else example_width + 1),
        torch.tensor([context - example_width if width else 1], dtype=torch.int32),
    )
    inputs += [
        ct.TensorType("causal_mask", shape=(1, 1, query, attended), dtype=np.float16),
        ct.TensorType("position", shape=(1,), dtype=np.int32),
    ]
    outputs = [ct.TensorType("logits" if last else "output_hidden_states", dtype=np.float16)]
    with running_only(model, chunk.first_layer, chunk.end_layer):
        wrapper = StatefulCausalLM(model, layout.chunk_cache_shape(chunk), chunk.first_layer, last).eval()
        cache = ct.TensorType(shape=tuple(wrapper.keyCache.shape), dtype=np.float16)
        if not stateful:
            example += (wrapper.keyCache, wrapper.valueCache)
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example, check_trace=False)
    if stateful:
        states = [ct.StateType(cache, name="keyCache"), ct.StateType(cache, name="valueCache")]
    else:
        states = None
        inputs += [
            ct.TensorType("keyCache", shape=cache.shape, dtype=np.float16),
            ct.TensorType("valueCache", shape=cache.shape, dtype=np.float16),
        ]
        outputs += [ct.TensorType("keyCacheOut", dtype=np.float16), ct.TensorType("valueCacheOut", dtype=np.float16)]
    return ct_convert(traced, inputs, outputs, states, deployment, quant)


def ct_convert(traced, inputs: list, outputs: list, states: list | None, deployment: str, quant):
    """A traced module as an fp16 ML Program for `deployment`, its weights compressed as `quant` asks, without
    loading it (which only macOS can)."""
    return ct.convert(
        traced,
        inputs=inputs,
        outputs=outputs,
        states=states,
        minimum_deployment_target=DEPLOYMENT_TARGETS[deployment],
        compute_precision=ct.precision.FLOAT16,
        pass_pipeline=pipeline(quant, deployment in WITH_STATE),
        skip_model_load=True,
    )


def pipeline(quant, stateful: bool):
    """coremltools' default passes with coremltools.optimize's compression among them: after the fp16 cast, before
    the clean-up passes that fold the compressed weights into their ops. Compressing the converted model afterwards
    (`cto.linear_quantize_weights(mlmodel)`) gives the same program but first writes the fp16 one out, reads it back
    and runs every pass again: twice the time and a second copy of the weights."""
    passes = ct.PassPipeline.DEFAULT
    if quant.is_float:
        return passes
    if quant.name == "palettize4":  # a table per 16 output channels from iOS 18, one per tensor before
        grouped = (
            {"granularity": "per_grouped_channel", "group_size": 16} if stateful else {"granularity": "per_tensor"}
        )
        op = cto.OpPalettizerConfig(nbits=4, mode="kmeans", weight_threshold=MIN_WEIGHTS, **grouped)
        name = "edgeport::palettize_weights"
    else:
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype=f"int{quant.bits}",
            granularity="per_block" if quant.group_size else "per_channel",
            block_size=quant.group_size or 32,
            weight_threshold=MIN_WEIGHTS,
        )
        name = "edgeport::linear_quantize_weights"
    passes.insert_pass(len(passes.passes) - len(ct.PassPipeline.CLEANUP.passes), name)
    passes.set_options(
        name, {"config": cto.OptimizationConfig(op_type_configs={op_type: op for op_type in COMPRESSED_OPS})}
    )
    return passes


class _PagingOut:
    """A compression pass that hands back the checkpoint's pages a weight was read from once it is compressed: the
    trace read every weight of a memory-mapped source, whose pages stayed counted in this process, and the
    compressed copies grew beside them (Whisper large-v3-turbo's int8 encoder: 1.33 GB of them and 0.64 GB of int8)."""

    def transform_op(self, op):
        super().transform_op(op)
        page_out_checkpoints()


@register_pass(namespace="edgeport")
class linear_quantize_weights(_PagingOut, _quantization_passes.linear_quantize_weights):
    """coremltools' compression::linear_quantize_weights, paging out: edgeport::linear_quantize_weights."""


@register_pass(namespace="edgeport")
class palettize_weights(_PagingOut, _quantization_passes.palettize_weights):
    """coremltools' compression::palettize_weights, paging out: edgeport::palettize_weights."""
