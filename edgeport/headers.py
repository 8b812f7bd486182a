"""Weight files checked before any library opens them: safetensors and GGUF headers against the file's bytes, and
the bounded sequential reader that these and CTranslate2's model.bin parser share.

Libraries trust what a header says: a safetensors shape of 2^56 rows, a GGUF array of 2^60 strings or an offset
past the end reach them as allocations, hangs or silent truncation. Here every count, length, shape and offset is
held against the bytes that are really there, and each refusal names the file and the problem.
"""

import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from edgeport.errors import EdgeportError

MAX_SAFETENSORS_HEADER = 100 * 2**20  # the limit the safetensors library itself sets
MAX_RANK = 8
MAX_DIM = 2**40  # no real tensor comes near; numpy refuses sizes past 2^63, even of an empty tensor
MAX_VALUES = 2**48  # the product of a shape's non-zero dimensions: what numpy must be able to count
SAFETENSORS_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_MIN_KV_BYTES = 8 + 4 + 1  # an empty key, a type, the smallest value
GGUF_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # an empty name, one dimension, a type, an offset


def regular_file(file: Path) -> Path:
    """`file` itself, refused unless it is a regular file (links followed): a FIFO or a device never ends."""
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        raise EdgeportError(f"{file}: cannot be read ({e.strerror})") from e
    if not stat.S_ISREG(mode):
        raise EdgeportError(f"{file}: not a regular file (a device, a FIFO or a socket); give the weights file itself")
    return file


@dataclass(frozen=True)
class TensorSpan:
    dtype: str  # safetensors' name: BF16, F16, F32, …
    shape: tuple[int, ...]
    start: int  # where its bytes begin in the file
    stop: int


def check_safetensors(file: Path) -> int:
    """The number of values a safetensors file holds, once every tensor's dtype and shape match its byte span and
    the spans tile the data exactly: sorted, contiguous, within the file."""
    return sum(_count(list(span.shape)) for span in safetensors_spans(file).values())


def safetensors_spans(file: Path) -> dict[str, TensorSpan]:
    """Every tensor of a safetensors file and where its bytes lie, checked as `check_safetensors` says."""
    size = regular_file(file).stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise _bad(file, f"its header length {header_len} does not fit in the {size}-byte file")
        header = parse_json(f.read(header_len), file, "its header")
    if not isinstance(header, dict):
        raise _bad(file, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(file, "__metadata__ must map names to strings")
    spans = sorted((_tensor_span(file, name, info), name) for name, info in header.items())
    end = 0
    for (start, stop), name in spans:
        if start != end:
            problem = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes"
            raise _bad(file, f"tensor {name} {problem}")
        end = stop
    if end != size - 8 - header_len:
        raise EdgeportError(
            f"{file}: truncated or corrupt (header says {end} bytes of tensors, file holds {size - 8 - header_len}); "
            "re-download it"
        )
    base = 8 + header_len
    return {
        name: TensorSpan(header[name]["dtype"], tuple(header[name]["shape"]), base + start, base + stop)
        for (start, stop), name in spans
    }


def _tensor_span(file: Path, name: str, info) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise _bad(file, f"tensor {name} is described by a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        raise _bad(file, f"tensor {name} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not sane_shape(shape):
        raise _bad(file, f"tensor {name} has a malformed shape {str(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise _bad(file, f"tensor {name} has malformed data_offsets {str(offsets)[:80]}")
    start, stop = offsets
    bits = _count(shape) * SAFETENSORS_BITS[dtype]
    if start > stop or bits % 8 or bits // 8 != stop - start:
        raise _bad(
            file, f"tensor {name} of shape {shape} in {dtype} needs {bits / 8:g} bytes, its offsets span {stop - start}"
        )
    return start, stop


@dataclass(frozen=True)
class GGUFWeights:
    """What a GGUF file's tensors hold: their values, the bits each is stored in on average (block scales
    included), and the ggml type most of them are stored as."""

    values: int
    bits: float
    main_type: str


def check_gguf(file: Path) -> GGUFWeights:
    """What a GGUF file holds, once its header (magic, version, counts, keys and values, tensor infos) lies within
    the file and every tensor's data, at its type's size, lies within the data section without overlapping
    another."""
    size = regular_file(file).stat().st_size
    if size < 24:
        raise _bad(file, f"{size} bytes is too short for a GGUF header", "GGUF")
    with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = BoundedReader(data, file, "GGUF")
        if reader.take(4) != b"GGUF":
            raise reader.error("no GGUF magic")
        version = reader.unpack("I")
        if version not in GGUF_VERSIONS:
            raise reader.error(f"version {version}; edgeport reads GGUF versions 2 and 3")
        tensors, kvs = reader.unpack("Q"), reader.unpack("Q")
        if kvs > reader.remaining // GGUF_MIN_KV_BYTES or tensors > reader.remaining // GGUF_MIN_TENSOR_BYTES:
            raise reader.error(f"{kvs} keys and {tensors} tensors cannot fit in {size} bytes")
        alignment = 32
        for _ in range(kvs):
            key = reader.string("Q")
            value = _gguf_value(reader, reader.unpack("I"), key)
            if key == "general.alignment":
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
                    raise reader.error(f"general.alignment {value!r} is not a power of two")
                alignment = value
        typed = [_gguf_tensor(reader, alignment) for _ in range(tensors)]
        infos, kinds = [info for info, _ in typed], [kind for _, kind in typed]
        names = [name for name, _, _, _ in infos]
        if len(set(names)) != len(names):
            raise reader.error("two tensors share a name")
        data_start = -(-reader.at // alignment) * alignment
        end = data_start
        for offset, nbytes, name in sorted((o, n, name) for name, o, n, _ in infos):
            if data_start + offset < end:
                raise _bad(file, f"tensor {name} overlaps the tensor before it", "GGUF")
            end = data_start + offset + nbytes
            if end > size:
                raise _bad(file, f"tensor {name} ends at byte {end}, past the end of the {size}-byte file", "GGUF")
    return _gguf_weights(infos, kinds)


def _gguf_weights(infos: list, kinds: list[str]) -> GGUFWeights:
    values = sum(count for _, _, _, count in infos)
    by_type: dict[str, int] = {}
    for (_, _, _, count), kind in zip(infos, kinds, strict=True):
        by_type[kind] = by_type.get(kind, 0) + count
    stored = sum(nbytes for _, _, nbytes, _ in infos)
    return GGUFWeights(values, 8 * stored / max(values, 1), max(by_type, key=by_type.get, default="F32"))


def _gguf_value(reader: "BoundedReader", kind: int, key: str, in_array: bool = False):
    if kind in GGUF_SCALARS:
        return reader.unpack(GGUF_SCALARS[kind])
    if kind == GGUF_STRING:
        return reader.string("Q")
    if kind != GGUF_ARRAY or in_array:
        raise reader.error(f"key {key[:80]} has an unknown value type {kind}")
    item, count = reader.unpack("I"), reader.unpack("Q")
    if item in GGUF_SCALARS:
        reader.skip(count * struct.calcsize(GGUF_SCALARS[item]))
        return None
    if item == GGUF_STRING and count <= reader.remaining // 8:
        for _ in range(count):
            reader.string("Q")
        return None
    if item == GGUF_STRING:
        raise reader.error(f"key {key[:80]} holds {count} strings, more than the file can")
    kind = "an array of arrays" if item == GGUF_ARRAY else f"an array of unknown type {item}"
    raise reader.error(f"key {key[:80]} is {kind}, which GGUF does not allow")


def _gguf_tensor(reader: "BoundedReader", alignment: int) -> tuple[tuple[str, int, int, int], str]:
    """A tensor's name, data offset, bytes and values, and its ggml type's name."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # the convert extra's; plan needs none

    name = reader.string("Q")
    dims = reader.unpack("I")
    if not 1 <= dims <= GGUF_MAX_DIMS:
        raise reader.error(f"tensor {name[:80]} has {dims} dimensions")
    shape = [reader.unpack("Q") for _ in range(dims)]
    if not sane_shape(shape):
        raise reader.error(f"tensor {name[:80]} has a shape beyond any real tensor, {shape}")
    kind = reader.unpack("I")
    try:
        ggml_type = GGMLQuantizationType(kind)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise reader.error(f"tensor {name[:80]} has an unknown ggml type {kind}") from None
    offset = reader.unpack("Q")
    count = _count(shape)
    if shape[0] % block:
        raise reader.error(f"tensor {name[:80]} has a row of {shape[0]}, not a multiple of its block of {block}")
    if offset % alignment:
        raise reader.error(f"tensor {name[:80]} starts at offset {offset}, not aligned to {alignment}")
    return (name, offset, count // block * type_size, count), ggml_type.name


class BoundedReader:
    """Sequential little-endian reads from a memory-mapped file, each checked against its end."""

    def __init__(self, data, file: Path, kind: str):
        self.data, self.file, self.kind, self.at = data, file, kind, 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.at

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise self.error(f"{size} bytes asked, {self.remaining} left: truncated")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def skip(self, size: int) -> None:
        if size > self.remaining:
            raise self.error(f"{size} bytes to skip, {self.remaining} left: truncated")
        self.at += size

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, length_fmt: str) -> str:
        raw = self.take(self.unpack(length_fmt))
        try:
            return raw.rstrip(b"\0").decode()
        except UnicodeDecodeError as e:
            raise self.error("a name is not UTF-8 text") from e

    def error(self, what: str) -> EdgeportError:
        return EdgeportError(f"{self.file}: not a valid {self.kind} file ({what} at byte {self.at}); re-download it")


def parse_json(raw: bytes, file: Path, what: str):
    """JSON as data: UTF-8 (escapes included), no NaN or Infinity, no number too large for a float, no key given
    twice."""
    try:
        value = json.loads(
            raw.decode(), parse_constant=_refuse_constant, parse_float=_finite, object_pairs_hook=_unique
        )
        json.dumps(value, ensure_ascii=False).encode()  # a lone surrogate escape ("\ud800") is no UTF-8 text
    except (UnicodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise EdgeportError(f"{file}: {what} is not valid JSON ({str(e)[:120]})") from e
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is too large")
    return value


def _unique(pairs: list) -> dict:
    table = dict(pairs)
    if len(table) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice[:80]!r} is given twice")
    return table


def sane_shape(shape: list) -> bool:
    """Whole dimensions, none past MAX_DIM, whose non-zero product numpy can hold."""
    if not all(_natural(d) and d <= MAX_DIM for d in shape):
        return False
    return _count([d for d in shape if d]) <= MAX_VALUES


def _count(shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(file: Path, problem: str, kind: str = "safetensors") -> EdgeportError:
    return EdgeportError(f"{file}: not a valid {kind} file ({problem}); re-download it")
