"""Library chatter stays off the user's screen: progress bars, advisory warnings and log lines of transformers,
huggingface_hub, torch and tqdm. edgeport's own progress is what a user sees; `--verbose` lets the
libraries speak again.

It works through the libraries' own switches, set before they are imported (every command imports some: `plan`
counts a model's parameters with transformers on torch's meta device).
"""

import contextlib
import io
import logging
import os
import warnings

ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # every tqdm bar (tqdm >= 4.66 reads TQDM_* defaults from the environment)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's bars, which transformers' follow
    "HF_HUB_VERBOSITY": "error",  # its "Retrying in 8s [Retry 4/5]" lines
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' advisory warnings ("loss_type=None", GGUF dtypes, …)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # the tokenizers fork warning
}
silenced = False  # whether this process has quieted them (its step processes then do too)


def silence_libraries() -> None:
    """Quiet every library for the rest of this process (and the processes it starts)."""
    global silenced
    silenced = True
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")  # FutureWarnings and UserWarnings from library internals
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


@contextlib.contextmanager
def converting():
    """A converter's libraries at work (the tracer's warnings, the quantizer's advice, coremltools' progress bars)
    print to a log nobody reads, not over edgeport's own progress line, even under --verbose."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
