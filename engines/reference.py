"""The source in transformers on the CPU in float32: the reference every artifact's parity is measured against.

A float32 copy of a whole model is twice a bf16 source: 32 GB for an 8B model. So the reference runs the model
paged: built empty (on PyTorch's meta device), each block's weights (a decoder layer, a norm) read from the
safetensors files in float32 when the block runs and let go when it returns; the vocabulary's tables (the embedding,
the output projection) a slice of rows at a time. Memory then holds one block at a time, and the logits are the same
to the bit as the whole model's, since each block computes on the same float32 weights. It is mlx-lm's lazy loading,
done for transformers."""

import functools
import inspect
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgeport.engines.whisper import WhisperRunner

STORED = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # the dtypes a reference reads (torch names)
SLICE_VALUES = 2**24  # values read from a file at a time: 32 MB of bf16


class Checkpoint:
    """A model folder's safetensors tensors, each read into float32 by plain file reads a slice at a time: no mapping
    of the file stays in memory, and no copy in the stored dtype is made beside the float32 one."""

    def __init__(self, folder: Path):
        from edgeport.headers import safetensors_spans

        self.spans = {}
        for file in sorted(folder.glob("*.safetensors")):
            self.spans.update({name: (file, span) for name, span in safetensors_spans(file).items()})

    def __contains__(self, name: str) -> bool:
        return name in self.spans and self.spans[name][1].dtype in STORED

    def read(self, name: str, rows: slice | None = None, dtype=None):
        """The tensor `name` in float32 (or `dtype`, converted a slice at a time), or only `rows` of its first
        dimension."""
        import torch

        file, span = self.spans[name]
        stored = getattr(torch, STORED[span.dtype])
        shape, skipped = span.shape, 0
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_values = int(np.prod(shape[1:]))
            shape, skipped = (stop - start, *shape[1:]), start * row_values * stored.itemsize
        out = torch.empty(shape, dtype=dtype or torch.float32)
        flat, done = out.view(-1), 0
        with open(file, "rb") as f:
            f.seek(span.start + skipped)
            while done < flat.numel():
                count = min(SLICE_VALUES, flat.numel() - done)
                raw = bytearray(count * stored.itemsize)
                f.readinto(raw)
                flat[done : done + count] = torch.frombuffer(raw, dtype=stored)
                done += count
        return out


def paged(
    source,
    pages: Callable[[str], bool],
    checkpoint=None,
    only: Callable[[str], bool] | None = None,
    matrices=None,
    rows: tuple[int, int] | None = None,
    **options,
):
    """`source`'s model in float32 whose blocks named so that `pages(name)` holds are read from `checkpoint` (by
    default the source's own safetensors) each time they run; the others are read once, now, or, where `only` is
    given and does not hold, left on the meta device (a converter that builds the model part by part); the
    matrices of those read once (linear layers' and embeddings' weights) in `matrices` where given, and only their
    `rows` where given (a part of the embedding or the head alone). A block is
    an item of a ModuleList (a layer) or a module outside one that holds weights itself (an embedding, a norm, the
    output projection). `options` go to `from_config` (e.g. attn_implementation). None where the checkpoint's
    tensors are not the model's own: transformers converts some when loading (fused MoE experts), and a checkpoint
    may be stored in a dtype the reference does not read."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():  # weights on the meta device; buffers (rotary frequencies) computed for real
        config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
        model = getattr(transformers, source.family.auto_model).from_config(
            config, dtype=torch.float32, trust_remote_code=source.trust_remote_code, **options
        )
    model.tie_weights()
    checkpoint = checkpoint or Checkpoint(source.path)
    keys = _checkpoint_keys(model, checkpoint)
    if keys is None:
        return None
    held = {}  # what was read once, by checkpoint key: tied parameters stay one (Whisper's output projection)
    for name, block in _blocks(model):
        if only is not None and not only(name):
            continue
        if pages(name) and _streams(block):
            _stream_rows(block, keys[f"{name}.weight"], checkpoint)
        elif pages(name):
            block.register_forward_pre_hook(lambda module, args, name=name: _read(module, name, keys, checkpoint))
            block.register_forward_hook(lambda module, args, out: _release(module))
        else:
            _read(block, name, keys, checkpoint, matrices, held, rows)
    return model.eval()


def whole(source, **options):
    """`source`'s model in float32, read as `paged` reads a block (no mapping of the checkpoint left resident, no
    copy in its stored dtype beside the float32 one: transformers' own loading holds both, 5.3 GB for Whisper
    large-v3-turbo's 3.2), or by transformers where the checkpoint cannot be read so."""
    return paged(source, lambda block: False, **options) or source.load_reference(**options)


def part_of(
    source,
    first: int,
    end: int,
    embedding: bool | None = None,
    head: bool | None = None,
    matrices=None,
    rows: tuple[int, int] | None = None,
    **options,
):
    """The source's model with only decoder layers [first, end) read (in float32; its matrices in `matrices` where
    given), with the embedding where the part starts the decoder (or `embedding`) and the final norm and output
    projection where it ends it (or `head`); the rest stays on the meta device. A part of the embedding or the head
    alone may read only `rows` of its table (for `vocab_rows`). `options` go to `from_config`. None where the
    checkpoint cannot be read a block at a time."""
    layers = source.family.dims(source.config).layers
    embedding = first == 0 if embedding is None else embedding
    head = end == layers if head is None else head
    if rows is not None and first != end:
        raise ValueError("only a part without layers reads a slice of the vocabulary")

    def in_part(block: str) -> bool:
        layer = re.search(r"\.layers\.(\d+)$", block)
        if layer:
            return first <= int(layer.group(1)) < end
        return embedding if "embed" in block else head

    return paged(source, lambda block: False, only=in_part, matrices=matrices, rows=rows, **options)


@contextmanager
def vocab_rows(model, rows: tuple[int, int] | None):
    """`model`'s token embedding and output projection computing over only `rows` of the vocabulary while inside:
    the projection gives those tokens' logits, the embedding those tokens' rows and zeros for every other token
    (from a row of zeros after them, so that the table's lookup stays the module's last step). The NPU shape exports
    a table too large for one unit so, a slice at a time. A table read whole is cut to its rows; one that part_of
    read with `rows` holds only them."""
    import torch

    if rows is None:
        yield model
        return
    start, stop = rows
    embedding, cut = model.get_input_embeddings(), []
    for module in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
        if module.weight.is_meta:
            continue
        cut.append((module, module.weight))
        table = module.weight if module.weight.shape[0] == stop - start else module.weight[start:stop]
        if module is embedding:
            table = torch.cat([table, table.new_zeros(1, table.shape[1])])
        module._parameters["weight"] = torch.nn.Parameter(table, requires_grad=False)
    if any(module is embedding for module, _ in cut):
        lookup = embedding.forward  # the module's own (a scaled embedding scales its rows)
        embedding.forward = lambda ids: lookup(torch.where((ids >= start) & (ids < stop), ids - start, stop - start))
    try:
        yield model
    finally:
        for module, weight in cut:
            module._parameters["weight"] = weight
        vars(embedding).pop("forward", None)


def kv_cache(model, cache) -> dict:
    """`cache` as the keyword `model`'s forward takes it: `cache` in newer transformers, where `past_key_values` is
    deprecated (to go in 5.40), and `past_key_values` before."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class) -> str:  # read once per class: Whisper's decoder asks at every token
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def part_forward(model, inputs, last: bool, cache, **arguments):
    """One part of `model` (see `running_only`) on `inputs` over the KV `cache`: token ids where the part starts the
    decoder, else the previous part's hidden states; returns logits where it ends the decoder, else its own hidden
    states."""
    given = {"inputs_embeds": inputs} if inputs.is_floating_point() else {"input_ids": inputs}
    given |= kv_cache(model, cache)
    if last:
        return model(**given, **arguments).logits
    return model.base_model(**given, **arguments).last_hidden_state


@contextmanager
def running_only(model, first: int, end: int, final_norm: bool | None = None):
    """`model` (a transformers causal LM) running only decoder layers [first, end), and its final norm only where
    they end the decoder (or `final_norm`): one part of a model that a converter builds part by part. Its weights keep
    their names."""
    import torch

    class Window(torch.nn.ModuleList):
        """All the layers, registered under their own indices, of which the forward runs [first, end)."""

        def __getitem__(self, index):
            if isinstance(index, slice):  # transformers runs `self.layers[: num_hidden_layers]`
                return list(self._modules.values())[first:end]
            return super().__getitem__(index)

    decoder = model.base_model
    layers, norm = decoder.layers, decoder.norm
    window = Window()
    window._modules.update(layers._modules)
    decoder.layers = window
    if not (end == len(layers) if final_norm is None else final_norm):
        decoder.norm = torch.nn.Identity()
    try:
        yield model
    finally:
        decoder.layers, decoder.norm = layers, norm


def _checkpoint_keys(model, checkpoint) -> dict[str, str] | None:
    """Each parameter's tensor in the checkpoint: its own, or that of the parameter it is tied to."""
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    keys = {}
    for names in tied.values():
        stored = [name for name in names if name in checkpoint]
        if not stored:
            return None
        keys.update({name: name if name in stored else stored[0] for name in names})
    return keys


def _blocks(model) -> list[tuple[str, object]]:
    import torch

    found = []

    def walk(module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            owns = next(child.parameters(recurse=False), None) is not None
            if isinstance(module, torch.nn.ModuleList) or (owns and next(child.children(), None) is None):
                found.append((full, child))
            else:
                walk(child, full + ".")

    walk(model, "")
    return found


def _read(block, name: str, keys: dict, checkpoint, matrices=None, held: dict | None = None, rows=None) -> None:
    """Read `block`'s parameters (its matrices in `matrices` where given, and only their `rows` where given); one
    already `held` (by checkpoint key) is shared, not read again."""
    import torch

    held = {} if held is None else held
    for local, _ in list(block.named_parameters()):
        owner, _, leaf = local.rpartition(".")
        module = block.get_submodule(owner) if owner else block
        key = keys[f"{name}.{local}"]
        if key not in held:
            matrix = leaf == "weight" and isinstance(module, torch.nn.Linear | torch.nn.Embedding)
            part = slice(*rows) if matrix and rows else None
            value = checkpoint.read(key, part, matrices) if matrix and matrices else checkpoint.read(key, part)
            held[key] = torch.nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = held[key]


def _streams(block) -> bool:
    """A token embedding or an output projection as torch's own modules compute them: a table that `_stream_rows`
    can read a slice of rows at a time (a subclass may compute more, e.g. Gemma 3's scaled embedding)."""
    import torch

    plain = type(block) is torch.nn.Embedding or (type(block) is torch.nn.Linear and block.bias is None)
    return plain and block.weight.numel() > SLICE_VALUES


def _stream_rows(block, key: str, checkpoint) -> None:
    """Run `block` (see `_streams`) reading its table from `checkpoint` a slice of rows at a time: a vocabulary's
    table in float32 is the largest block of a model (Llama-3.2-1B's 1.05 GB, Llama-3.1-8B's 2.1 GB), and a slice
    of it gives the same figures (the embedding copies rows; each logit is the same dot product)."""
    import torch

    vocab, width = block.weight.shape
    step = max(1, SLICE_VALUES // width)
    slices = [slice(start, min(start + step, vocab)) for start in range(0, vocab, step)]

    def embed(ids):
        out = torch.empty((*ids.shape, width))
        for rows in slices:
            hit = (ids >= rows.start) & (ids < rows.stop)
            if hit.any():
                out[hit] = checkpoint.read(key, rows)[ids[hit] - rows.start]
        return out

    def project(hidden):
        out = torch.empty((*hidden.shape[:-1], vocab))
        for rows in slices:
            out[..., rows] = torch.nn.functional.linear(hidden, checkpoint.read(key, rows))
        return out

    block.forward = embed if isinstance(block, torch.nn.Embedding) else project


def _release(block) -> None:
    import torch

    for module in block.modules():
        for leaf, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[leaf] = torch.nn.Parameter(parameter.to("meta"), requires_grad=False)


class TorchRunner:
    """A causal LM's next-token logits."""

    engine = "transformers (torch, CPU, float32)"

    def __init__(self, source, model=None):
        import torch

        self.torch = torch
        self.model = model or paged(source, lambda block: True) or source.load_reference()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids])).logits[0]
        return out.float().numpy()


class TorchWhisper(WhisperRunner):
    """Whisper through the shared loop: the encoder once per window, the decoder with transformers' KV cache."""

    def __init__(self, source, model=None):
        import torch
        import transformers

        super().__init__(source.path)
        self.torch = torch
        # Only the encoder's layers are paged: the decoder runs once per token, and reading it each time would cost
        # more than it holds (the encoder is most of a Whisper model).
        self.model = (
            model or paged(source, lambda block: block.startswith("model.encoder.layers.")) or source.load_reference()
        )
        self.engine = f"transformers {transformers.__version__} (torch, CPU, float32)"

    def encode(self, mel: np.ndarray):
        with self.torch.no_grad():
            return self.model.model.encoder(self.torch.from_numpy(mel)).last_hidden_state

    def begin(self, encoded) -> None:
        self.encoded, self.cache = encoded, None

    def step(self, tokens: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(
                encoder_outputs=(self.encoded,),
                decoder_input_ids=self.torch.tensor([tokens]),
                use_cache=True,
                **kv_cache(self.model, self.cache),
            )
        self.cache = returned_cache(out)
        return out.logits[0, -1].float().numpy()
