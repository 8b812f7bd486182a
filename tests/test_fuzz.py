"""Every input the fuzzer ever found a reader mishandling is replayed, and each reader gets a short fuzzing pass
(`make fuzz` runs them for minutes; see tests/fuzzing.py)."""

import tempfile
from pathlib import Path

import pytest
from fuzzing import FINDINGS, READERS, fuzz, prepare, run_one

SAVED = sorted(FINDINGS.glob("*/*.bin"))


@pytest.mark.parametrize("finding", SAVED, ids=[f"{f.parent.name}/{f.stem}" for f in SAVED])
def test_a_saved_finding_is_handled(finding: Path):
    reader = READERS[finding.parent.name]
    with tempfile.TemporaryDirectory() as tmp:
        prepare(reader, Path(tmp))
        run_one(reader, finding.read_bytes(), Path(tmp))


@pytest.mark.parametrize("name", READERS)
def test_a_short_fuzzing_pass_finds_nothing(name, monkeypatch, tmp_path):
    monkeypatch.setattr("fuzzing.FINDINGS", tmp_path)  # a finding here fails the test; it is not filed away
    executions, findings = fuzz(READERS[name], seconds=0, examples=150)
    assert executions >= 150 and not findings, [f.read_bytes()[:200] for f in findings]
