"""Real English text that every installation has, so no workload ever reaches the network."""

from importlib import resources
from pathlib import Path

from edgeport.errors import EdgeportError
from edgeport.headers import regular_file

# Sections of the Python language reference, shipped with every CPython as pydoc_data.
ARTICLE_TOPICS = ("execmodel", "exceptions", "import", "naming")
INSTRUCTION = "Summarize the following text in a few sentences.\n\n"


def reference_paragraph() -> str:
    """The opening paragraph of A Tale of Two Cities (public domain): the perplexity text."""
    return resources.files("edgeport").joinpath("data/two_cities.txt").read_text().strip()


def default_article() -> str:
    """A long technical article to summarize: Python's own reference on its execution model."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in ARTICLE_TOPICS if name in topics)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as one user turn in the model's chat template (plain text without one).

    The template is rendered to text and then encoded, which behaves the same for a transformers tokenizer
    and for mlx-lm's wrapper of one.
    """
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        return list(tokenizer.encode(prompt))
    messages = [{"role": "user", "content": prompt}]
    try:  # transformers renders templates in jinja's sandbox: a template reaching for Python stops there
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise EdgeportError(
            f"the model's chat template was refused ({type(e).__name__}: {str(e)[:120]}); "
            "fix or remove chat_template in its tokenizer files"
        ) from e
    return list(tokenizer.encode(text, add_special_tokens=False))


def summary_prompt(tokenizer, text: str, length: int) -> list[int]:
    """Token ids of a summary request of exactly `length` tokens: the chat template around the instruction and as
    much of `text` as fits (repeated when it is short), cut at a token rather than a word."""
    longer = chat_ids(tokenizer, summary_request(tokenizer, text, length, over=True))
    empty = chat_ids(tokenizer, "")  # the template alone: the tokens before and after the user's message
    before = _common_prefix(longer, empty)
    after = min(_common_prefix(longer[::-1], empty[before:][::-1]), len(longer) - before)
    room = length - before - after
    if room < 1:
        raise EdgeportError(f"a {length}-token prompt cannot hold the chat template and the instruction")
    return longer[:before] + longer[before : len(longer) - after][:room] + longer[len(longer) - after :]


def summary_request(tokenizer, text: str, length: int, over: bool = False) -> str:
    """The user's message: the instruction and the longest prefix of `text` (repeated when it is short) that keeps
    the chat prompt within `length` tokens; with `over`, the shortest that passes it."""
    words = text.split()
    if not words:
        raise EdgeportError("the text to summarize is empty")

    def request(n: int) -> str:
        return INSTRUCTION + " ".join(words[:n])

    if len(chat_ids(tokenizer, request(1))) > length:
        raise EdgeportError(f"a {length}-token prompt cannot hold the summary instruction; use a longer one")
    while len(chat_ids(tokenizer, request(len(words)))) <= length:
        words = words + words
    low, high = 1, len(words)
    while low < high:  # binary search on the number of words
        mid = (low + high + 1) // 2
        if len(chat_ids(tokenizer, request(mid))) <= length:
            low = mid
        else:
            high = mid - 1
    return request(low + 1 if over else low)


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def read_text(file: Path) -> str:
    try:
        return regular_file(file).read_text()
    except UnicodeDecodeError as e:
        raise EdgeportError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
