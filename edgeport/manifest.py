"""manifest.json: one versioned description of an output folder, validated whenever it is read."""

import json
import platform
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

import edgeport
from edgeport.errors import EdgeportError
from edgeport.files import read_json
from edgeport.source import sha256_file

SCHEMA_VERSION = 1
FILENAME = "manifest.json"
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
REQUIRED = {
    "schema_version": int,
    "edgeport_version": str,
    "created": str,
    "source": dict,
    "target": dict,
    "plan": dict,
    "artifacts": list,
    "not_built": list,
    "tools": dict,
}
ARTIFACT_REQUIRED = {
    "format": str,
    "quantization": str,
    "path": str,
    "engine": str,
    "files": list,
    "bytes": int,
    "parity": dict,
    "details": dict,
}
FILE_REQUIRED = {"path": str, "bytes": int, "sha256": str}
SHA256 = re.compile(r"[0-9a-f]{64}")


def build(source, target, plan, built: list, not_built: list[dict], out: Path) -> dict:
    """The manifest for an output folder; `built` holds (Artifact, Parity) pairs whose paths lie under `out`."""
    return {
        "schema_version": SCHEMA_VERSION,
        "edgeport_version": edgeport.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "ref": source.ref,
            "kind": source.kind,
            "model_type": source.model_type,
            "family": source.family,
            "revision": source.revision,
            "sha256": source.origin_sha256(),
        },
        "target": {"name": target.name, "ram_gb": target.ram_gb, "description": target.description},
        "plan": plan.to_dict(),
        "artifacts": [_artifact_entry(artifact, parity, out) for artifact, parity in built],
        "not_built": not_built,
        "tools": tool_versions(),
    }


def write(manifest: dict, folder: Path) -> None:
    validate(manifest, folder / FILENAME)
    (folder / FILENAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read(folder: Path) -> dict:
    """The validated manifest of an output folder. It is data, not instructions: every path it names is checked to
    lie inside `folder` before anything opens it."""
    file = Path(folder) / FILENAME
    manifest = read_json(file, "is this an `edgeport convert` output folder?")
    validate(manifest, file)
    return manifest


def validate(manifest: dict, where: Path) -> None:
    if not isinstance(manifest, dict):
        raise EdgeportError(f"{where}: not a manifest")
    found = manifest.get("schema_version")
    if found != SCHEMA_VERSION:
        raise EdgeportError(
            f"{where}: schema version {found}, this edgeport reads {SCHEMA_VERSION}; convert again with this version"
        )
    _check_fields(manifest, REQUIRED, where, "")
    for i, artifact in enumerate(manifest["artifacts"]):
        _check_fields(artifact, ARTIFACT_REQUIRED, where, f"artifacts[{i}].")
        if artifact["parity"].get("status") not in ("passed", "failed", "not checked"):
            raise EdgeportError(f"{where}: artifacts[{i}].parity.status must be passed, failed or not checked")
        _check_path(artifact["path"], where, f"artifacts[{i}].path")
        for j, entry in enumerate(artifact["files"]):
            field = f"artifacts[{i}].files[{j}]"
            if not isinstance(entry, dict):
                raise EdgeportError(f"{where}: field {field} is not an object")
            _check_fields(entry, FILE_REQUIRED, where, f"{field}.")
            _check_path(entry["path"], where, f"{field}.path")
            if entry["bytes"] < 0 or not SHA256.fullmatch(entry["sha256"]):
                raise EdgeportError(f"{where}: field {field} has a negative size or a malformed sha256")


def listed_files(manifest: dict) -> set[str]:
    """The paths, relative to the output folder, of every artifact file a validated manifest lists."""
    return {entry["path"] for artifact in manifest["artifacts"] for entry in artifact["files"]}


def _check_path(value: str, where: Path, field: str) -> None:
    """A manifest path must be relative and stay inside its folder, symbolic links followed."""
    path = PurePosixPath(value)
    folder = where.parent.resolve()
    if not value or path.is_absolute() or "\\" in value or ".." in path.parts:
        raise EdgeportError(f"{where}: {field} '{value}' is not a relative path inside the output folder")
    if not (folder / path).resolve().is_relative_to(folder):
        raise EdgeportError(f"{where}: {field} '{value}' leads outside the output folder (a symbolic link)")


def verify_files(manifest: dict, folder: Path) -> list[str]:
    """Problems with the files the manifest lists: missing, or bytes/sha256 no longer as recorded."""
    problems = []
    for artifact in manifest["artifacts"]:
        for entry in artifact["files"]:
            file = folder / entry["path"]
            if not file.is_file():
                problems.append(f"{entry['path']}: missing")
            elif file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                problems.append(f"{entry['path']}: changed since conversion")
    return problems


def tool_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TOOLS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def _artifact_entry(artifact, parity, out: Path) -> dict:
    files = sorted(f for f in artifact.path.rglob("*") if f.is_file())
    entries = [{"path": str(f.relative_to(out)), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
    return {
        "format": artifact.format,
        "quantization": artifact.quantization,
        "path": str(artifact.path.relative_to(out)),
        "engine": artifact.engine,
        "files": entries,
        "bytes": sum(e["bytes"] for e in entries),
        "details": artifact.details,
        "parity": parity.to_dict(),
    }


def _check_fields(table: dict, required: dict, where: Path, prefix: str) -> None:
    for key, kind in required.items():
        if not isinstance(table.get(key), kind):
            raise EdgeportError(f"{where}: field {prefix}{key} is missing or not a {kind.__name__}")
