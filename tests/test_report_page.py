"""`edgeport report`: one self-contained HTML page, checked in headless Chromium (Debian's package, which
`make test` installs): every plot decoded and drawn, its title in the DOM, the screenshot not blank."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import run_cli
from test_fit import gguf_only, variant

from edgeport import fit
from edgeport.targets import Budget

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own probe starts it: no sandbox as root, no GPU, no background connections to a closed network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(tmp_path, page, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def benched_output(tiny_llama, tmp_path_factory):
    """The tiny model as GGUF for a gguf-only m2-air, benched here: a plan beside a measurement."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")
    folder = tmp_path_factory.mktemp("report")
    out = folder / "out"
    code, _, err = run_cli("convert", str(tiny_llama), "-t", gguf_only(folder), "--out", str(out), "--parity", "fast")
    assert code == 0, err
    code, _, err = run_cli("bench", str(out), "-p", "64", "-n", "4", "-r", "1")
    assert code == 0, err
    return out


def a_fit(tmp_path):
    variants = [
        variant("q8", 0.001, decode=30),
        variant("q4", 0.07, decode=80, origin="published"),
        variant("q3", None, decode=90, origin="unknown", meets=False, misses="peak misses"),
    ]
    budget = Budget(512, None, 20.0, None, None, 2.0)
    result = fit.Fit("m2-air", "summarize", budget, variants, 1, "mlx q4: …")
    file = tmp_path / "fit.json"
    file.write_text(json.dumps(result.to_dict()))
    return file


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by `make test` (apt-get)")
def test_the_report_renders_every_plot_in_chromium(benched_output, tmp_path):
    page = tmp_path / "report.html"
    code, _, err = run_cli("report", str(a_fit(tmp_path)), str(benched_output), "-o", str(page))
    assert code == 0, err
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text  # self-contained: nothing to fetch
    dom = chromium(tmp_path, page, "--dump-dom")
    assert 'data-checked="yes"' in dom  # the page's check ran once everything had loaded
    plots = re.findall(r"<img [^>]*class=\"plot\"[^>]*>", dom)
    assert len(plots) == 3  # quality and speed of the fit, plan vs bench of the output
    for img in plots:
        alt = re.search(r'alt="([^"]+)"', img)[1]
        assert int(re.search(r'data-width="(\d+)"', img)[1]) > 100, alt  # decoded by the browser
        assert int(re.search(r'data-colours="(\d+)"', img)[1]) >= 8, alt  # drawn: not one flat colour
        assert f'<h3 class="plot-title">{alt}</h3>' in dom
    titles = re.findall(r'<h3 class="plot-title">([^<]+)</h3>', dom)
    assert titles[:2] == ["Quality vs memory on m2-air", "Decode speed vs memory on m2-air"]
    assert titles[2].startswith("Plan vs bench: gguf Q4_K_M")
    assert "Parity per artifact" in dom and "Versions: edgeport" in dom

    from PIL import Image

    chromium(tmp_path, page, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,2000")
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    assert shot.shape[0] == 2000 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200  # a page, not a blank


def test_report_writes_only_its_own_file(tmp_path):
    mine = tmp_path / "notes.html"
    mine.write_text("<p>mine</p>")
    code, _, err = run_cli("report", str(a_fit(tmp_path)), "-o", str(mine))
    assert code != 0 and "not a report edgeport wrote" in err and mine.read_text() == "<p>mine</p>"
    code, _, err = run_cli("report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html"))
    assert code != 0 and "no such output folder or fit result" in err
    code, _, err = run_cli("report", str(mine), "-o", str(tmp_path / "r.html"))
    assert code != 0 and "notes.html" in err and not (tmp_path / "r.html").exists()
