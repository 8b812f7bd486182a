"""`edgeport report`: one self-contained HTML page (plots embedded as PNG) from conversions' output folders (their
manifests and bench results) and `fit` results: quality and speed against size per variant with the target's budget
drawn, the plan's prediction beside each measurement, parity per artifact, and the machine and versions."""

import base64
import html
import io
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeport import __version__, manifest
from edgeport.errors import EdgeportError
from edgeport.files import read_json
from edgeport.fit import Fit
from edgeport.plan import GB
from edgeport.report import model_name

# One colour and marker per format, the same in every plot.
STYLE = {
    "mlx": ("#1f77b4", "o"),
    "coreml": ("#d62728", "s"),
    "onnx": ("#2ca02c", "^"),
    "gguf": ("#9467bd", "D"),
    "ct2": ("#ff7f0e", "v"),
}
TOOLS = ("torch", "transformers", "mlx", "mlx-lm", "coremltools", "onnxruntime", "llama-cpp-python", "ctranslate2")


@dataclass
class Output:
    """An output folder: its manifest, and its bench result where `edgeport bench` wrote one."""

    folder: Path
    manifest: manifest.Manifest
    bench: object | None  # runtime.results.BenchResult


def read_inputs(paths: list[Path]) -> tuple[list[Output], list[Fit]]:
    """Each path is an output folder (holding manifest.json) or a fit result (`edgeport fit … --out FILE`)."""
    from edgeport.runtime.results import BenchResult

    outputs, fits = [], []
    for path in paths:
        if path.is_dir():
            found = manifest.read(path)
            file = path / "bench.json"
            bench = BenchResult.from_dict(read_json(file, ""), file) if file.is_file() else None
            outputs.append(Output(path, found, bench))
        elif path.is_file():
            fits.append(Fit.from_dict(read_json(path, ""), str(path)))
        else:
            raise EdgeportError(f"{path}: no such output folder or fit result")
    return outputs, fits


def render(outputs: list[Output], fits: list[Fit]) -> str:
    """The whole page as one HTML string."""
    sections = [_fit_section(f) for f in fits] + [_output_section(o) for o in outputs]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(
        title="edgeport report",
        generated=generated,
        machine=_e(f"{platform.system()} {platform.machine()}, {_cpu()}, Python {platform.python_version()}"),
        versions=_e(", ".join(f"{name} {version}" for name, version in _versions().items())),
        sections="\n".join(sections),
    )


def _fit_section(fit: Fit) -> str:
    models = ", ".join(dict.fromkeys(model_name(v.model) for v in fit.variants))
    speech = fit.task == "transcribe"
    pick = fit.pick
    verdict = f"Recommended: {fit.reason}" if pick else f"No variant meets the whole budget: {fit.reason}"
    plots = [_plot_quality(fit), _plot_speed(fit)]
    several = len({v.model for v in fit.variants}) > 1
    rows = []
    for i, v in enumerate(fit.variants):
        s, q = v.step, v.quality
        loss = "—" if q.loss is None else (f"{q.loss:+.3f}" if speech else f"{q.loss:+.1%}")
        speed = f"RTF {s.rtf:.3f}" if speech else f"{s.decode_tps:,.1f} tok/s, TTFT {s.ttft_s:.2f} s"
        rows.append(
            [
                *([model_name(v.model)] if several else []),
                ("★ " if i == fit.recommended else "") + f"{s.format} {s.unit}",
                s.quantization,
                f"{s.weight_bytes / GB:.3f} GB",
                f"{s.peak_bytes / GB:.2f} GB",
                speed,
                "met" if s.meets_budget else f"missed: {s.misses}",
                loss,
                q.origin + (" (fails parity)" if q.parity == "failed" else ""),
            ]
        )
    columns = [
        *(["model"] if several else []),
        "format",
        "quant",
        "size",
        "peak",
        "expected speed",
        "budget",
        "Δ WER" if speech else "ppl Δ",
    ]
    table = _table([*columns, "quality"], rows)
    notes = "".join(f"<li>{_e(n)}</li>" for n in fit.notes)
    return (
        f"<section><h2>Fit: {_e(models)} on {_e(fit.target)}</h2>"
        f"<p class=verdict>{_e(verdict)}</p>{''.join(plots)}{table}<ul class=notes>{notes}</ul></section>"
    )


def _output_section(out: Output) -> str:
    m = out.manifest
    family = m.source.model_family
    rows = []
    for a in m.artifacts:
        metrics = ", ".join(f"{k} {v}" for k, v in a.parity.metrics.items() if k in family.metrics)
        why = "; ".join(a.parity.failures + a.parity.not_checked)
        rows.append([a.format, a.quantization, f"{a.bytes / GB:.3f} GB", a.parity.status, metrics, why])
    parity = _table(["format", "quant", "size", "parity", "metrics", "notes"], rows)
    title = f"{model_name(m.source.ref)} for {m.target.name} ({out.folder})"
    bench = _prediction_section(out) if out.bench else "<p>No bench result: run <code>edgeport bench</code> on it.</p>"
    return f"<section><h2>Output: {_e(title)}</h2><h3>Parity per artifact</h3>{parity}{bench}</section>"


def _prediction_section(out: Output) -> str:
    """The plan's expected figures beside what `edgeport bench` measured, with a plot."""
    bench, plan = out.bench, out.manifest.plan
    step = next((s for s in plan.steps if s.format == bench.format and s.quantization == bench.quantization), None)
    if step is None:
        return "<p>The bench result names no planned artifact.</p>"
    where = f"measured on {bench.machine.get('cpu') or bench.machine.get('arch')}, predicted for {plan.target}"
    if bench.workload == "transcribe":
        r = bench.results[0]
        pairs = [("RTF", step.rtf, r.rtf), ("peak memory (GB)", step.peak_bytes / GB, r.peak_gb)]
    else:
        r = min(bench.results, key=lambda r: abs(r.prompt_tokens - plan.prompt_tokens))
        pairs = [
            ("decode (tok/s)", step.decode_tps, r.decode_tps),
            ("prefill (tok/s)", step.prefill_tps, r.prefill_tps),
            ("peak memory (GB)", step.peak_bytes / GB, r.peak_gb),
        ]
    rows = [[name, f"{p:,.3g}", f"{m:,.3g}", f"{m / p - 1:+.0%}" if p else "—"] for name, p, m in pairs]
    plot = _plot_prediction(f"Plan vs bench: {bench.format} {bench.quantization}", pairs, where)
    return plot + _table(["figure", "predicted", "measured", "measured vs predicted"], rows)


# Plots


def _plot_quality(fit: Fit) -> str:
    speech = fit.task == "transcribe"
    known = [v for v in fit.variants if v.quality.loss is not None]
    title = f"Quality vs memory on {fit.target}"

    def draw(ax):
        for v in known:
            y = v.quality.loss if speech else 100 * v.quality.loss
            _point(ax, v, v.step.peak_bytes / GB, y, v is fit.pick)
        _memory_budget(ax, fit, [v.step.peak_bytes / GB for v in known])
        ax.set_ylabel("WER increase (absolute)" if speech else "perplexity increase (%)")
        if not speech and known and max(v.quality.loss for v in known) > 1:  # above +100 %: the small losses apart
            ax.set_yscale("symlog", linthresh=10)

    return _figure(title, draw, "Hollow markers: published figures; filled: measured here; ★ the recommendation.")


def _plot_speed(fit: Fit) -> str:
    speech = fit.task == "transcribe"
    title = f"{'Real-time factor' if speech else 'Decode speed'} vs memory on {fit.target}"

    def draw(ax):
        for v in fit.variants:
            y = v.step.rtf if speech else v.step.decode_tps
            _point(ax, v, v.step.peak_bytes / GB, y, v is fit.pick, filled=True)
        budget = fit.budget.rtf if speech else fit.budget.decode_tps
        if budget:
            ax.axhline(budget, color="black", linestyle=":", label="speed budget")
        _memory_budget(ax, fit, [v.step.peak_bytes / GB for v in fit.variants])
        ax.set_ylabel("RTF (lower is faster)" if speech else "decode (tok/s, expected)")

    return _figure(title, draw, "Speeds are the plan's expected figures on the target.")


def _plot_prediction(title: str, pairs: list, where: str) -> str:
    def draw(ax):
        import numpy as np

        x = np.arange(len(pairs))
        ratio = [m / p if p else 0 for _, p, m in pairs]
        ax.bar(x, ratio, color="#1f77b4", label="measured / predicted")
        ax.axhline(1.0, color="black", linestyle="--", label="prediction")
        ax.set_xticks(x, [name for name, _, _ in pairs])
        ax.set_ylabel("measured / predicted")

    return _figure(title, draw, f"{where[0].upper()}{where[1:]}; 1.0: the measurement equals the plan's prediction.")


def _memory_budget(ax, fit: Fit, peaks: list[float]) -> None:
    """The memory budget as a vertical line, where it falls near the variants; else said in the legend, so that
    a budget far beyond them does not squeeze them into a corner."""
    budget = fit.budget.peak_memory_gb
    ax.set_xlabel("peak memory (GB, expected)")
    if peaks and budget > 3 * max(peaks):
        ax.plot([], [], color="black", linestyle="--", label=f"memory budget {budget:g} GB (far right of all)")
        return
    ax.axvline(budget, color="black", linestyle="--", label=f"memory budget {budget:g} GB")


def _point(ax, v, x: float, y: float, picked: bool, filled: bool | None = None) -> None:
    colour, marker = STYLE.get(v.step.format, ("#7f7f7f", "o"))
    filled = v.quality.origin == "measured" if filled is None else filled
    label = v.step.format
    if label in ax.get_legend_handles_labels()[1]:
        label = None
    face = colour if filled else "none"
    ax.scatter([x], [y], marker=marker, s=60, facecolors=face, edgecolors=colour, label=label)
    if picked:
        ax.scatter([x], [y], marker="*", s=320, facecolors="gold", edgecolors="black", zorder=5, label="recommended")
    ax.annotate(v.step.quantization, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _figure(title: str, draw, caption: str) -> str:
    """A matplotlib figure as an embedded PNG in a <figure> with its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    draw(ax)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<figure><h3 class=plot-title>{_e(title)}</h3><img class=plot alt="{_e(title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _cpu() -> str:
    from edgeport.machine import cpu_name

    return cpu_name() or platform.processor() or "unknown CPU"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"edgeport": __version__}
    for name in TOOLS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


# Each plot, once the browser has decoded it, is marked with its pixel size and whether it holds more than one
# colour: what a reader (and the test, from the DOM) can check without trusting the file.
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1em 0; }} img.plot {{ max-width: 100%; }} .verdict {{ font-weight: bold; }}
.notes {{ font-size: 12px; color: #555; }} section {{ border-top: 2px solid #ddd; margin-top: 2em; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Generated {generated} on {machine}.<br>Versions: {versions}.</p>
{sections}
<script>
window.addEventListener("load", () => {{
  for (const img of document.querySelectorAll("img.plot")) {{
    img.dataset.width = img.naturalWidth;
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    for (let i = 0; i < pixels.length && colours.size < 64; i += 4 * 97) colours.add(pixels.slice(i, i + 3).join());
    img.dataset.colours = colours.size;
  }}
  document.body.dataset.checked = "yes";
}});
</script>
</body></html>
"""
