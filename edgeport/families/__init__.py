"""A model family is one object, chosen once from the source's config: it supplies its dimensions (a typed
dataclass read from config.json), its plan figures, its parity reference and metrics, its bench workload and its
table columns, so that no stage branches on the family. Converters are registered under (family, format) in
edgeport.convert; runners are chosen from the artifact's layout (edgeport.layouts, edgeport.engines).

Each family has:
- `name`, `metrics` (the parity metrics its tables read), `speed_columns` and `metric_columns` (its tables)
- `dims(config)`: LMDims or WhisperDims, the one place KV and cache shapes are derived
- the plan: `formats(target)`, `size(config)`, `context_length(source, target)`, `prompt_tokens(target)`,
  `step(size, target, format, quantization, unit) -> Step`
- parity: `check_inputs(source)` (before any work), `reference(source)` (the source's outputs, computed once),
  `measure(reference, runner, quantization, not_checked) -> Parity`
- the bench: `workload`, the module of edgeport.runtime whose `bench_artifact` measures it
- tables: `plan_speeds(step)`, `plan_rooflines(step)`, `plan_note(plan, kv)`, `metric_cells(metrics, num)`,
  `metric_notes(name, metrics, num)`
"""

from edgeport.errors import EdgeportError
from edgeport.families.causal_lm import CausalLM
from edgeport.families.whisper import Whisper
from edgeport.source import WHISPER_TYPES

FAMILIES = {family.name: family for family in (CausalLM(), Whisper())}


def family_of(model_type: str):
    """The family a config's model_type belongs to."""
    return FAMILIES[Whisper.name if model_type in WHISPER_TYPES else CausalLM.name]


def named(name: str, where: str = "manifest"):
    """A family by the name a manifest records."""
    if name not in FAMILIES:
        raise EdgeportError(f"{where}: source.family must be one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
