import json
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli

from edgeport import targets
from edgeport.errors import EdgeportError

REQUIRED = {
    "host",
    "m1",
    "m2-air",
    "m3-pro",
    "m4-max",
    "iphone-15-pro",
    "iphone-16-pro",
    "snapdragon-8-gen-3",
    "snapdragon-8-elite",
    "snapdragon-x-elite",
}


def test_every_profile_loads_and_cites_its_figures():
    assert set(targets.names()) >= REQUIRED
    for name in targets.names():
        target = targets.load(name)
        assert target.usable_ram_gb < target.ram_gb + 1e-9 and target.formats
        text = (targets._profiles() / f"{name}.toml").read_text()
        assert name == "host" or "https://" in text, f"{name}.toml cites no source for its figures"


def test_ram_variants():
    assert targets.load("m2-air", ram_gb=8).ram_gb == 8
    assert targets.load("m2-air").ram_gb == 16
    with pytest.raises(EdgeportError, match="m2-air comes with 8, 16, 24 GB"):
        targets.load("m2-air", ram_gb=12)


def test_misspelt_target_gets_the_closest_name_and_the_list():
    with pytest.raises(EdgeportError, match=r"did you mean 'm2-air'.*known targets: host"):
        targets.load("m2air")


def test_host_is_measured():
    host = targets.load("host")
    assert host.measured and host.bandwidth_gbs > 1 and host.tflops["cpu"] > 0.001 and host.ram_gb > 1


def test_a_bad_profile_names_the_file_and_field():
    data = tomllib.loads((targets._profiles() / "m2-air.toml").read_text())
    data["formats"][0]["quantization"] = "q7"
    with pytest.raises(EdgeportError, match=r"targets/x.toml: formats\[0\].quantization 'q7' is not one for mlx"):
        targets.parse(data, "targets/x.toml")
    data["formats"][0]["quantization"] = "q4"
    del data["bandwidth_gbs"]
    with pytest.raises(EdgeportError, match="field bandwidth_gbs is missing"):
        targets.parse(data, "targets/x.toml")
    data["bandwidth_gbs"], data["cpu_arch"] = 100, "sparc"
    with pytest.raises(EdgeportError, match="field cpu_arch must be one of arm64, x86_64, not sparc"):
        targets.parse(data, "targets/x.toml")


def test_a_target_of_the_users_own_from_a_toml_file(tmp_path, tiny_llama):
    import json

    profile = (Path(targets.__file__).parent / "m2-air.toml").read_text()
    own = tmp_path / "my-laptop.toml"
    own.write_text(profile.replace('name = "m2-air"', 'name = "my-laptop"'))
    code, out, err = run_cli("plan", str(tiny_llama), "-t", str(own), "--json")
    assert code == 0, err
    assert json.loads(out)["target"] == "my-laptop"
    own.write_text(profile.replace("usable_ram_fraction", "usable_ram_fractio"))
    code, out, err = run_cli("plan", str(tiny_llama), "-t", str(own))
    assert code == 3 and f"{own}: field usable_ram_fraction" in err
    own.write_text("name = ")
    code, out, err = run_cli("plan", str(tiny_llama), "-t", str(own))
    assert code == 3 and "not a valid TOML file" in err


def test_host_measured_under_load_is_used_but_not_cached_and_measure_measures_again(monkeypatch, tmp_path, capsys):
    from edgeport import report

    monkeypatch.setattr(report.err, "file", sys.stderr)  # what capsys reads, whatever an earlier test left there
    monkeypatch.setattr(targets, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(targets, "_THIS_RUN", {})
    monkeypatch.setattr(targets, "_times", lambda n, fn: [1.0, 1.0, 2.0])  # one repeat twice as slow
    busy = targets.host_facts()
    assert busy["spread"] == 2.0 and not (tmp_path / "host.json").exists()
    err = capsys.readouterr().err
    assert "measuring this machine" in err and "differed by 2.0x" in err and "edgeport targets --measure" in err

    monkeypatch.setattr(targets, "_times", lambda n, fn: [1.0, 1.0, 1.1])
    quiet = targets.host_facts(remeasure=True)
    assert json.loads((tmp_path / "host.json").read_text())["spread"] == quiet["spread"] == 1.1
    assert "differed" not in capsys.readouterr().err

    monkeypatch.setattr(targets, "_THIS_RUN", {})
    monkeypatch.setattr(targets, "_times", lambda n, fn: [0.5, 0.5, 0.5])
    assert targets.host_facts() == quiet  # cached: not measured again
    code, _, err = run_cli("targets", "--measure")
    assert code == 0 and "measuring this machine" in err
    assert json.loads((tmp_path / "host.json").read_text())["spread"] == 1.0
