"""Real English text that every installation has, so no workload ever reaches the network."""

from importlib import resources

from edgeport.errors import EdgeportError

# Sections of the Python language reference, shipped with every CPython as pydoc_data.
ARTICLE_TOPICS = ("execmodel", "exceptions", "import", "naming")


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
