"""Built-in chat templates, as Jinja files, for tokenizers that ship none.

A tokenizer's own template is always preferred; ``template: NAME`` replaces it (with a
warning) and the template used is saved with the trained model.
"""

from __future__ import annotations

import logging
from importlib import resources

from sftlab.errors import SftlabError

log = logging.getLogger(__name__)


def builtin_names() -> list[str]:
    files = resources.files(__package__).iterdir()
    return sorted(f.name.removesuffix(".jinja") for f in files if f.name.endswith(".jinja"))


def builtin_template(name: str) -> str:
    if name not in builtin_names():
        raise SftlabError(f"template: unknown template '{name}'; built-in ones are {', '.join(builtin_names())} (or leave it empty to use the tokenizer's own)")
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(name: str | None, own: str | dict | None) -> str:
    """The Jinja chat template to render with: the built-in ``name`` if given, else the tokenizer's own.

    Raises SftlabError when neither exists.
    """
    if isinstance(own, dict):  # several named templates: the default one renders conversations
        own = own.get("default")
    if name:
        text = builtin_template(name)
        if own and own != text:
            log.warning("template: %s replaces the tokenizer's own chat template (the one used is saved with the model)", name)
        return text
    if not own:
        raise SftlabError(
            "this tokenizer has no chat template: set template: default (base models), chatml or llama3"
        )
    return own
