"""Core ML packages: prediction through coremltools on macOS (the KV cache as Core ML state on iOS 18 / macOS 15,
passed in and out before), and, anywhere, the package read as data: its interface, how each weight is stored, and
the weights themselves decompressed, which is how parity checks a package where it cannot run."""

import inspect
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeport.engines.loop import Token, TokenClock, hf_tokenizer, mask_at_position, mask_new_at_end
from edgeport.engines.reference import Checkpoint, TorchRunner, TorchWhisper, paged
from edgeport.engines.whisper import WhisperRunner
from edgeport.errors import EdgeportError
from edgeport.layouts import CoreMLModel, CoreMLWhisper, Layout
from edgeport.machine import ON_MAC

NEEDS_MACOS = "Core ML prediction needs macOS"
DECOMPRESS_VALUES = 2**24  # values of a blockwise weight decompressed at a time


def unavailable_here() -> str | None:
    return None if ON_MAC else NEEDS_MACOS


def runner(layout: Layout, folder: Path):
    return CoreMLRunner(folder) if isinstance(layout, CoreMLModel) else CoreMLWhisperRunner(folder)


def parity_runner(layout: Layout, folder: Path, quantized: bool, source):
    """The package itself on a Mac; elsewhere the source's architecture in transformers with the package's
    weights read back and decompressed: what the compression did, measurable where Core ML cannot predict."""
    if unavailable_here() is None:
        return runner(layout, folder), None
    if isinstance(layout, CoreMLModel):
        what = "the package's weights were"
        opened = PackageWeightsRunner(source, folder)
    else:
        what = "the packages' weights were"
        opened = PackageWeightsWhisper(source, folder)
    return opened, f"{NEEDS_MACOS} ({what} read back, decompressed and run in transformers)"


def _predicting(folder: Path):
    """coremltools, where it can predict."""
    reason = unavailable_here()
    if reason:
        raise EdgeportError(f"{folder}: {reason}; bench it on a Mac (macOS 15 or later)")
    return coremltools()


def coremltools():
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)  # off macOS it warns at import that it cannot predict
    import coremltools as ct

    return ct


class CoreMLRunner:
    """A causal LM's chunks: prefill and decode through coremltools' prediction API, each call through every chunk
    in order, the hidden states passed on."""

    def __init__(self, path: Path):
        ct = _predicting(path)
        self.layout = layout = CoreMLModel.read(path)
        units = getattr(ct.ComputeUnit, layout.compute_units)
        self.context, self.chunk = layout.context_length, layout.prefill_chunk
        self.decoders, self.prefillers = [], []
        for chunk in layout.chunks:
            package = str(path / chunk.package)
            if layout.prefill_chunk:  # the Neural Engine shape: static prefill and decode functions
                decoder = ct.models.MLModel(package, compute_units=units, function_name="decode")
                prefiller = ct.models.MLModel(package, compute_units=units, function_name="prefill")
            else:
                decoder = prefiller = ct.models.MLModel(package, compute_units=units)
            self.decoders.append(decoder)
            self.prefillers.append(prefiller)
        self.tokenizer = hf_tokenizer(path)
        self.engine = f"Core ML (coremltools {ct.__version__}, {layout.compute_units}, {len(layout.chunks)} chunks)"

    def logits(self, ids: list[int]) -> np.ndarray:
        states = self._new_caches()
        return np.concatenate(list(self._prefill(ids, states)))

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Token]:
        start = time.perf_counter()
        states = self._new_caches()
        logits = list(self._prefill(prompt, states))[-1]
        clock, position = TokenClock(len(prompt), start), len(prompt)
        for _ in range(max_tokens):
            token = int(np.argmax(logits[-1]))
            yield clock.token(token)
            if token == self.tokenizer.eos_token_id or clock.generated >= max_tokens or position >= self.context:
                break
            logits = self._predict(self.decoders, [token], position, 1, states)
            position += 1

    def _prefill(self, ids: list[int], states: list) -> Iterator[np.ndarray]:
        width = self.chunk or len(ids)
        for start in range(0, len(ids), width):
            chunk = ids[start : start + width]
            yield self._predict(self.prefillers, chunk, start, width, states)[: len(chunk)]

    def _predict(self, models: list, tokens: list[int], position: int, width: int, states: list) -> np.ndarray:
        attended = self.context if self.chunk else position + width
        shared = {
            "causal_mask": mask_at_position(position, width, attended, -np.inf),
            "position": np.array([position], np.int32),
        }
        given = {"input_ids": np.array([tokens + [0] * (width - len(tokens))], np.int32)}
        for model, state in zip(models, states, strict=True):
            inputs = {**shared, **given}
            if isinstance(state, dict):  # before iOS 18 / macOS 15 the cache goes in and comes back out
                out = model.predict({**inputs, **state})
                state.update(keyCache=out["keyCacheOut"], valueCache=out["valueCacheOut"])
            else:
                out = model.predict(inputs, state=state)
            given = {"hidden_states": out.get("output_hidden_states")}
        return out["logits"][0].astype(np.float32)

    def _new_caches(self) -> list:
        if self.layout.kv_cache == "state":
            return [decoder.make_state() for decoder in self.decoders]
        caches = []
        for chunk in self.layout.chunks:
            shape = self.layout.chunk_cache_shape(chunk)
            caches.append({"keyCache": np.zeros(shape, np.float16), "valueCache": np.zeros(shape, np.float16)})
        return caches


class CoreMLWhisperRunner(WhisperRunner):
    """The Whisper pair: `encoder.mlpackage` once per window, `decoder.mlpackage` one token per call."""

    def __init__(self, path: Path):
        ct = _predicting(path)
        super().__init__(path)
        self.layout = layout = CoreMLWhisper.read(path)
        units = getattr(ct.ComputeUnit, layout.compute_units)
        self.encoder = ct.models.MLModel(str(path / "encoder.mlpackage"), compute_units=units)
        self.decoder = ct.models.MLModel(str(path / "decoder.mlpackage"), compute_units=units)
        self.length = layout.cache_shape[3]
        self.engine = f"Core ML (coremltools {ct.__version__}, {layout.compute_units})"

    def encode(self, mel: np.ndarray):
        out = self.encoder.predict({"input_features": mel})
        return out["cross_key"].astype(np.float16), out["cross_value"].astype(np.float16)

    def begin(self, encoded) -> None:
        self.cross, self.filled = encoded, 0
        if self.layout.kv_cache == "state":
            self.state = self.decoder.make_state()
        else:
            shape = list(self.layout.cache_shape)
            shape[3] -= 1  # the new token's slot is not passed in
            self.state = {"past_key": np.zeros(shape, np.float16), "past_value": np.zeros(shape, np.float16)}

    def step(self, tokens: list[int]) -> np.ndarray:
        for token in tokens:
            n = self.filled
            if n >= self.length - 1:
                raise EdgeportError(f"the decoder's cache holds {self.length} tokens")
            stateless = isinstance(self.state, dict)  # the token's own slot is the last one, else its position
            mask = (mask_new_at_end if stateless else mask_at_position)(n, 1, self.length, -np.inf, np.float16)
            inputs = {
                "input_ids": np.array([[token]], np.int32),
                "position": np.array([n], np.int32),
                "attention_mask": mask,
                "cross_key": self.cross[0],
                "cross_value": self.cross[1],
            }
            if stateless:
                out = self.decoder.predict({**inputs, **self.state})
                self.state["past_key"][..., n, :] = out["new_key"][..., 0, :]
                self.state["past_value"][..., n, :] = out["new_value"][..., 0, :]
            else:
                out = self.decoder.predict(inputs, state=self.state)
            self.filled += 1
        return out["logits"][0, -1].astype(np.float32)


class PackageWeightsRunner(TorchRunner):
    """The source's architecture in transformers with the Core ML packages' weights, decompressed: paged, each
    block read when it runs from the packages' weights decompressed once into a scratch folder; the source read
    whole where its checkpoint cannot page."""

    def __init__(self, source, path: Path):
        layout = CoreMLModel.read(path)
        self.weights = PackageWeights(source, path, [chunk.package for chunk in layout.chunks])
        super().__init__(source, self.weights.paged(lambda block: True))
        self.engine = (
            f"transformers (torch, CPU, float32) with the weights of the {len(layout.chunks)} packages read back and "
            "decompressed, a block at a time; the norm scales (which the packages fold into other ops) rounded "
            "to fp16 as they compute them"
        )


class PackageWeightsWhisper(TorchWhisper):
    """Whisper's architecture in transformers with the Core ML packages' weights, decompressed: the encoder paged
    as the reference pages it."""

    def __init__(self, source, path: Path):
        self.weights = PackageWeights(source, path, ["encoder.mlpackage", "decoder.mlpackage"])
        super().__init__(source, self.weights.paged(lambda block: block.startswith("model.encoder.layers.")))
        self.engine += ", with the packages' weights read back and decompressed"


class PackageWeights:
    """Core ML packages' weights as the paged reference reads a checkpoint. Each package's weights are decompressed
    once, one weight at a time, into fp16 .npy files in a scratch folder (the precision Core ML computes them in;
    removed with this object), then read from there by name as blocks run. A vector the converter folded into
    another op (a norm scale) comes from the source, rounded to fp16; a missing matrix is an error."""

    def __init__(self, source, path: Path, packages: list[str]):
        self.source, self.path, self.packages = source, path, [path / package for package in packages]
        self.checkpoint = Checkpoint(source.path)
        self.scratch = tempfile.TemporaryDirectory(prefix="edgeport-coreml-weights-")
        self.folders = []
        for package in self.packages:
            folder = Path(self.scratch.name) / package.name
            folder.mkdir()
            _save_weights(package, folder)
            self.folders.append(folder)

    def paged(self, pages):
        """The source's model with these weights, the blocks `pages` names read as they run; the source read whole
        and overwritten where its checkpoint cannot page."""
        model = paged(self.source, pages, checkpoint=self)
        if model is None:
            model = self.source.load_reference()
            load_package_weights(model, self.packages)
        return model

    def __contains__(self, name: str) -> bool:
        """Whether the packages hold `name` (a tied output projection has its own copy in a package of its own, but
        not beside the embedding, where Core ML keeps one of two equal tensors) or the source does."""
        return self._file(name) is not None or name in self.checkpoint

    def _file(self, name: str) -> Path | None:
        stem = f"model_{name.replace('.', '_')}.npy"
        return next((folder / stem for folder in self.folders if (folder / stem).is_file()), None)

    def read(self, name: str, rows: slice | None = None):
        """The weight `name` in float32, or only `rows` of its first dimension."""
        import torch

        file = self._file(name)
        if file is not None:
            return torch.from_numpy(np.load(file, mmap_mode="r")[rows or slice(None)].astype(np.float32))
        if name in self.checkpoint and len(self.checkpoint.spans[name][1].shape) == 1:
            return self.checkpoint.read(name, rows).half().float()
        raise EdgeportError(f"{self.path}: the packages have no weight for {name}; convert again")


def load_package_weights(model, packages: list[Path]) -> tuple[int, int]:
    """Overwrite `model`'s parameters with the weights read back from Core ML `packages`, decompressed. A vector
    the converter folded away (a norm scale) or merged with an equal one is rounded to fp16, as the package
    computes it; a missing matrix is an error. Returns (parameters read back, parameters)."""
    import torch

    parameters = dict(model.named_parameters())  # tied weights appear once
    weights = {}
    for package in packages:
        weights.update(read_weights(package, list(parameters)))
    missing = [name for name, p in parameters.items() if name not in weights and p.dim() > 1]
    if missing:
        raise EdgeportError(f"{packages[0].parent}: the package has no weight for {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if name in weights:
                parameter.copy_(torch.from_numpy(weights[name]).reshape(parameter.shape))
            else:
                parameter.copy_(parameter.to(torch.float16).to(torch.float32))
    return len(weights), len(parameters)


def read_weights(package: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The package's weights as float arrays (compressed ones decompressed), keyed by the transformers parameter
    names they came from."""
    ops = weight_ops(package)
    found = {}
    for name in names:
        op = ops.get("model_" + name.replace(".", "_"))
        if op is not None:
            found[name] = decompressed(op)
    return found


def weight_ops(package: Path) -> dict:
    """The package's constants by the name of the parameter they came from: the converter names each weight after
    its parameter, dots made underscores, "model_" before it; vectors folded into other ops (norm scales) keep no
    name and are not found, and a compressed weight's own inputs (its data, its scales) are not weights."""
    found = {}
    for function in _program(package).functions.values():
        for op in function.operations:
            constant = op.op_type == "const" or op.op_type.startswith("constexpr_")
            if constant and not _decompressed_by_others(op):
                found.setdefault(_parameter_stem(op.name), op)
    return found


def _parameter_stem(name: str) -> str:
    return re.sub(r"(_promoted)?(_to_fp16)?(_quantized|_palettized)?$", "", name)


def _decompressed_by_others(op) -> bool:
    users = op.outputs[0].child_ops
    return bool(users) and all(user.op_type.startswith("constexpr_") for user in users)


def _save_weights(package: Path, folder: Path) -> None:
    """Each of the package's weights read from its weight file alone, decompressed by coremltools where it is
    compressed, into an fp16 .npy file in `folder`. Loading the package's program would hold every weight at once,
    and the weight file's pages besides: 1.6 GB for Whisper large-v3-turbo's int8 encoder, whose weights are 0.64."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    spec = _specification(package)
    operations = _operations(spec)
    constants = {op.outputs[0].name: op for op in operations if op.type == "const"}
    inputs_of_constexpr = {
        argument.name
        for op in operations
        if op.type.startswith("constexpr_")
        for given in op.inputs.values()
        for argument in given.arguments
    }
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    for op in operations:
        if op.type != "const" and not op.type.startswith("constexpr_"):
            continue
        stem = _parameter_stem(op.outputs[0].name)
        file = folder / f"{stem}.npy"
        if not stem.startswith("model_") or op.outputs[0].name in inputs_of_constexpr or file.exists():
            continue  # not a weight, a compressed weight's own data or scales, or a name already read
        if op.type == "const":
            value = _value(op.attributes["val"], weights)
            if not np.issubdtype(value.dtype, np.floating):
                raise EdgeportError(f"{package}: {op.outputs[0].name} is stored as {value.dtype}, not as a float")
            np.save(file, value.astype(np.float16))
        else:
            versions = SSAOpRegistry.core_ops[op.type]  # the op's definition for the package's iOS version
            kind = versions[max(v for v in versions if v <= spec.specificationVersion)]
            given = {name: _argument(value, constants) for name, value in op.inputs.items()} | dict(op.attributes)
            parameters = inspect.signature(kind.decompress).parameters
            save_decompressed(kind, {name: _value(given.get(name), weights) for name in parameters}, file)


def _argument(given, constants: dict):
    """An op's input as a value: given inline, or the const op it names."""
    (argument,) = given.arguments
    return argument.value if argument.HasField("value") else constants[argument.name].attributes["val"]


def _value(value, weights: Path):
    """A MIL value as coremltools reads it, a weight from its file with a reader of its own (which maps the file and
    keeps its pages until it goes)."""
    from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

    return None if value is None else _load_value(TranscriptionContext(str(weights)), value)


def save_decompressed(kind, values: dict, file: Path) -> None:
    """A weight compressed as the op `kind` (its definition in coremltools) stores it, decompressed to fp16 into a
    .npy `file`; a blockwise-quantized one a slice of rows at a time (whole, a vocabulary's int4 table takes four
    copies of itself in fp16 and float32: 3 GB at a 128k vocabulary)."""
    if kind.__name__ != "constexpr_blockwise_shift_scale":
        np.save(file, np.asarray(kind.decompress(**values), np.float32).astype(np.float16))
        return
    data, scale, offset = values["data"], values["scale"], values["offset"]
    per_scale = data.shape[0] // scale.shape[0]  # rows of data to a row of scales
    step = max(1, DECOMPRESS_VALUES // (data[0].size * per_scale)) * per_scale
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": data.shape}
    with open(file, "wb") as out:  # written, not mapped: a mapping's pages would count as this process's memory
        np.lib.format.write_array_header_1_0(out, header)
        for start in range(0, data.shape[0], step):
            scales = slice(start // per_scale, (start + step) // per_scale)
            offsets = None if offset is None else offset[scales]
            rows = kind.decompress(data[start : start + step], scale[scales], offsets)
            np.ascontiguousarray(rows, np.float16).tofile(out)


def decompressed(op) -> np.ndarray:
    value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
    return np.asarray(value, dtype=np.float32)


def describe(package: Path) -> dict:
    """The saved package as a reader finds it: its interface, and every weight matrix by how it is stored (for one
    function: a multifunction package's functions share their weights)."""
    from coremltools.converters.mil.frontend.milproto.helper import proto_to_types
    from coremltools.converters.mil.mil import types

    spec = _specification(package)
    description = spec.description

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
    ops, weights = Counter(), Counter()
    for op in _operations(spec):
        ops[op.type] += 1
        if op.type.startswith("constexpr_"):
            weights[op.type] += 1
        elif op.type == "const":
            value = proto_to_types(op.outputs[0].type)
            if types.is_tensor(value) and _is_matrix(value.get_shape()):
                weights[f"const {types.builtin_to_string(value.get_primitive())}"] += 1
    return {
        "functions": interface,
        "weight_matrices_by_storage": dict(weights),
        "sdpa_ops": ops.get("scaled_dot_product_attention", 0),
        "ops": sum(ops.values()),
    }


def _is_matrix(shape) -> bool:
    """At least two dimensions of more than one element: a weight, not a scalar shaped [1, 1, 1, 1]."""
    return sum(d > 1 for d in shape) >= 2


def _specification(package: Path):
    return coremltools().models.MLModel(str(package), skip_model_load=True).get_spec()


def _operations(spec) -> list:
    """The operations of the package's first function as its specification lists them, without its weights (a
    multifunction package's functions share them): loading the program would read every weight, 1 GB for one of
    Llama-3.2-1B's packages."""
    function = next(iter(spec.mlProgram.functions.values()))
    return list(function.block_specializations[function.opset].operations)


def _program(package: Path):
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    model = coremltools().models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return load_mil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
