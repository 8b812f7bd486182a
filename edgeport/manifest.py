"""manifest.json: one versioned description of an output folder, validated whenever it is read, and handed on
as a typed `Manifest`."""

import json
import math
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

import edgeport
from edgeport.errors import EdgeportError
from edgeport.files import read_json
from edgeport.isolated import StepCost
from edgeport.parity import Parity
from edgeport.plan import Plan
from edgeport.source import sha256_file

SCHEMA_VERSION = 1
FILENAME = "manifest.json"
REFERENCE = "reference"  # the folder of an output holding the source's outputs that parity compared with
TOOLS = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
    "gguf",
    "numpy",
    "mlx",
    "mlx-lm",
    "mlx-whisper",
    "coremltools",
    "onnx",
    "onnxruntime",
    "onnxruntime-genai",
    "ctranslate2",
    "jiwer",
    "soxr",
)
NUMBER = (int, float)
METRIC = (int, float, type(None))  # null where a metric overflowed or was not measured
STRINGS = [str]
# What every reader of a manifest relies on: a dict is an object with these fields (more are allowed), a list
# holds items of its one element's kind, a type (or tuple of types) is what the value must be.
FILE = {"path": str, "bytes": int, "sha256": str}
PARITY = {
    "status": str,
    "method": str,
    "bounds": dict,
    "metrics": dict,
    "failures": STRINGS,
    "not_checked": STRINGS,
    "seconds": NUMBER,
}
ARTIFACT = {
    "format": str,
    "quantization": str,
    "path": str,
    "engine": str,
    "files": [FILE],
    "bytes": int,
    "details": dict,
    "parity": PARITY,
}
SCHEMA = {
    "schema_version": int,
    "edgeport_version": str,
    "created": str,
    "source": {"ref": str, "kind": str, "model_type": str, "family": str},
    "target": {"name": str, "ram_gb": NUMBER, "description": str},
    "plan": dict,  # checked field by field by Plan.from_dict when the manifest is typed
    "artifacts": [ARTIFACT],
    "not_built": [{"format": str, "quantization": str, "reason": str}],
    "tools": dict,
}
# Fields a manifest of an earlier edgeport lacks, checked where present.
OPTIONAL = {
    "reference": {"level": str, "engine": str, "files": [FILE]},
    "steps": [{"step": str, "seconds": NUMBER, "peak_rss_bytes": int}],
    "preflight": [{"step": str, "peak_bytes": int, "seconds": NUMBER}],
}
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class SourceEntry:
    ref: str  # what the user named
    kind: str  # hf-folder | hf-hub | gguf | ct2
    model_type: str
    family: str
    revision: str | None = None
    sha256: dict | None = None  # the user's weight files, by name

    @property
    def model_family(self):
        from edgeport.families import named

        return named(self.family)


@dataclass
class TargetEntry:
    name: str
    ram_gb: float
    description: str


@dataclass
class FileEntry:
    path: str  # relative to the output folder
    bytes: int
    sha256: str


@dataclass
class ArtifactEntry:
    format: str
    quantization: str
    path: str  # the artifact's folder, relative to the output folder
    engine: str  # the library that made it, with its version
    files: list[FileEntry]
    bytes: int
    details: dict  # what the converter recorded: its layout, settings and timings
    parity: Parity


@dataclass
class ReferenceEntry:
    """The source's outputs on the parity inputs, stored in the output, that every artifact was compared with."""

    level: str  # --parity: full | fast
    engine: str  # what ran the source
    files: list[FileEntry]


@dataclass
class NotBuilt:
    format: str
    quantization: str
    reason: str


@dataclass
class Manifest:
    schema_version: int
    edgeport_version: str
    created: str
    source: SourceEntry
    target: TargetEntry
    plan: Plan
    artifacts: list[ArtifactEntry]
    not_built: list[NotBuilt]
    tools: dict  # package -> version
    reference: ReferenceEntry | None = None  # None with --parity none
    steps: list[StepCost] = field(default_factory=list)  # what each step of the conversion cost here
    preflight: list[dict] = field(default_factory=list)  # what the preflight predicted for each step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "Manifest":
        """A manifest read back from JSON, validated before anything is typed."""
        validate(data, where)
        artifacts = [
            ArtifactEntry(
                **{
                    **_known(a, ArtifactEntry),
                    "files": [FileEntry(**_known(f, FileEntry)) for f in a["files"]],
                    "parity": Parity(**_known(a["parity"], Parity)),
                }
            )
            for a in data["artifacts"]
        ]
        return cls(
            **{k: data[k] for k in ("schema_version", "edgeport_version", "created", "tools")},
            source=SourceEntry(**_known(data["source"], SourceEntry)),
            target=TargetEntry(**_known(data["target"], TargetEntry)),
            plan=Plan.from_dict(data["plan"], f"{where}: plan"),
            artifacts=artifacts,
            not_built=[NotBuilt(**_known(n, NotBuilt)) for n in data["not_built"]],
            reference=_reference(data.get("reference")),
            steps=[StepCost(**_known(s, StepCost)) for s in data.get("steps") or []],
            preflight=data.get("preflight") or [],
        )


def _reference(data: dict | None) -> ReferenceEntry | None:
    if data is None:
        return None
    files = [FileEntry(**_known(f, FileEntry)) for f in data["files"]]
    return ReferenceEntry(**{**_known(data, ReferenceEntry), "files": files})


def _known(data: dict, cls) -> dict:
    """The fields of `cls` in `data` (a manifest may carry more, which this version does not read)."""
    return {k: v for k, v in data.items() if k in cls.__dataclass_fields__}


def build(
    source,
    target,
    plan: Plan,
    built: list,
    not_built: list[NotBuilt],
    out: Path,
    reference: ReferenceEntry | None,
    steps: list[StepCost],
    estimates: list,
) -> Manifest:
    """The manifest for an output folder; `built` holds (Artifact, Parity) pairs whose paths lie under `out`."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        edgeport_version=edgeport.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        source=SourceEntry(
            source.ref, source.kind, source.model_type, source.family.name, source.revision, source.origin_sha256()
        ),
        target=TargetEntry(target.name, target.ram_gb, target.description),
        plan=plan,
        artifacts=[_artifact_entry(artifact, parity, out) for artifact, parity in built],
        not_built=not_built,
        tools=tool_versions(),
        reference=reference,
        steps=steps,
        preflight=[asdict(e) for e in estimates],
    )


def reference_entry(folder: Path, out: Path, level: str, engine: str) -> ReferenceEntry:
    return ReferenceEntry(level, engine, _file_entries(folder, out))


def write(manifest: Manifest, folder: Path) -> None:
    data = finite(manifest.to_dict())
    validate(data, folder / FILENAME)
    (folder / FILENAME).write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def finite(value):
    """`value` with every NaN or infinity (a perplexity that overflowed) as null: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read(folder: Path) -> Manifest:
    """The validated manifest of an output folder. It is data, not instructions: every path it names is checked to
    lie inside `folder` before anything opens it."""
    file = Path(folder) / FILENAME
    return Manifest.from_dict(read_json(file, "is this an `edgeport convert` output folder?"), file)


def validate(manifest: dict, where: Path) -> None:
    """`manifest` (as JSON gives it) holds every field this version reads, each of its type."""
    from edgeport.families import named

    if not isinstance(manifest, dict):
        raise EdgeportError(f"{where}: not a manifest")
    found = manifest.get("schema_version")
    if found != SCHEMA_VERSION:
        raise EdgeportError(
            f"{where}: schema version {str(found)[:20]}, this edgeport reads {SCHEMA_VERSION}; convert again with this "
            "version"
        )
    _check(manifest, SCHEMA, where, "")
    for name, spec in OPTIONAL.items():
        if manifest.get(name) is not None:
            _check(manifest[name], spec, where, name)
    source = manifest["source"]
    _check(source.get("revision") or "", str, where, "source.revision")
    _check(source.get("sha256") or {}, dict, where, "source.sha256")
    for name, digest in (source.get("sha256") or {}).items():
        _check(digest, str, where, f"source.sha256.{name[:40]}")
    family = named(manifest["source"]["family"], str(where))
    for i, artifact in enumerate(manifest["artifacts"]):
        parity = artifact["parity"]
        if parity["status"] not in ("passed", "failed", "not checked"):
            raise EdgeportError(f"{where}: artifacts[{i}].parity.status must be passed, failed or not checked")
        for name in family.metrics:
            _check(parity["metrics"].get(name, 0), METRIC, where, f"artifacts[{i}].parity.metrics.{name}")
        _check_path(artifact["path"], where, f"artifacts[{i}].path")
        _check_files(artifact["files"], where, f"artifacts[{i}].files")
    _check_files((manifest.get("reference") or {}).get("files", []), where, "reference.files")


def _check_files(entries: list[dict], where: Path, field: str) -> None:
    for j, entry in enumerate(entries):
        _check_path(entry["path"], where, f"{field}[{j}].path")
        if entry["bytes"] < 0 or not SHA256.fullmatch(entry["sha256"]):
            raise EdgeportError(f"{where}: {field}[{j}] has a negative size or a malformed sha256")


def listed_files(manifest: Manifest) -> set[str]:
    """The paths, relative to the output folder, of every file a validated manifest lists."""
    return {entry.path for entry in _all_files(manifest)}


def _all_files(manifest: Manifest) -> list[FileEntry]:
    """Every artifact's files, and the stored reference's."""
    reference = manifest.reference.files if manifest.reference else []
    return [entry for artifact in manifest.artifacts for entry in artifact.files] + reference


def _check_path(value: str, where: Path, field: str) -> None:
    """A manifest path must be relative and stay inside its folder, symbolic links followed."""
    path = PurePosixPath(value)
    folder = where.parent.resolve()
    if not value or path.is_absolute() or "\\" in value or ".." in path.parts:
        raise EdgeportError(f"{where}: {field} '{value}' is not a relative path inside the output folder")
    if not (folder / path).resolve().is_relative_to(folder):
        raise EdgeportError(f"{where}: {field} '{value}' leads outside the output folder (a symbolic link)")


def verify_files(manifest: Manifest, folder: Path) -> list[str]:
    """Problems with the files the manifest lists: missing, or bytes/sha256 no longer as recorded."""
    problems = []
    for entry in _all_files(manifest):
        file = folder / entry.path
        if not file.is_file():
            problems.append(f"{entry.path}: missing")
        elif file.stat().st_size != entry.bytes or sha256_file(file) != entry.sha256:
            problems.append(f"{entry.path}: changed since conversion")
    return problems


def missing_files(artifact: ArtifactEntry, folder: Path) -> list[str]:
    """The files of one artifact that are gone or no longer of their recorded size (no hashing: it is fast)."""
    return [
        entry.path
        for entry in artifact.files
        if not (folder / entry.path).is_file() or (folder / entry.path).stat().st_size != entry.bytes
    ]


def tool_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TOOLS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def _file_entries(folder: Path, out: Path) -> list[FileEntry]:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return [FileEntry(str(f.relative_to(out)), f.stat().st_size, sha256_file(f)) for f in files]


def _artifact_entry(artifact, parity: Parity, out: Path) -> ArtifactEntry:
    entries = _file_entries(artifact.path, out)
    return ArtifactEntry(
        format=artifact.format,
        quantization=artifact.quantization,
        path=str(artifact.path.relative_to(out)),
        engine=artifact.engine,
        files=entries,
        bytes=sum(e.bytes for e in entries),
        details=artifact.details,
        parity=parity,
    )


def _check(value, spec, where: Path, field: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise EdgeportError(f"{where}: field {field or 'the manifest'} is missing or not an object")
        for key, inner in spec.items():
            _check(value.get(key), inner, where, f"{field}.{key}" if field else key)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise EdgeportError(f"{where}: field {field} is missing or not a list")
        for i, item in enumerate(value):
            _check(item, spec[0], where, f"{field}[{i}]")
    elif not isinstance(value, spec) or isinstance(value, bool):
        kinds = spec if isinstance(spec, tuple) else (spec,)
        raise EdgeportError(f"{where}: field {field} is missing or not a {' or '.join(k.__name__ for k in kinds)}")
