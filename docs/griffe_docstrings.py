"""Griffe extension used by the documentation build only: renders the package's docstring conventions as Markdown.

The docstrings follow TRL's conventions, which mkdocstrings does not know:

* Sphinx roles (``:class:`~trl.GRPOConfig```, ``:func:`x```) and Hugging Face links (``[`~trl.GRPOConfig`]``) become
  inline code with the same text Sphinx would show (the last component after ``~``);
* a reST literal-block marker (``Example::``) becomes a single colon, as Sphinx shows it;
* Hugging Face parameter headers, ``name (`str`, *optional*, defaults to `"none"`):``, become ``name:``, so the type
  and default columns of the rendered table come from the signature instead of showing raw Markdown.

The source files are left untouched: only the text handed to the docstring parser changes.
"""

from __future__ import annotations

import re

import griffe

_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
_HF_LINK = re.compile(r"\[`(~?)([^`\]]+)`\]")
_RST_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)
_HF_PARAMETER = re.compile(r"^(?P<indent>\s+)(?P<name>\*{0,2}\w+) \((?P<spec>`[^\n]*)\):\s*$", re.MULTILINE)


def _shown(tilde: str, target: str) -> str:
    target = target.strip()
    return target.rsplit(".", 1)[-1] if tilde else target


def rewrite_docstring(text: str) -> str:
    """The Markdown-ready form of one docstring."""
    text = _SPHINX_ROLE.sub(lambda m: f"`{_shown(m.group(1), m.group(2))}`", text)
    text = _HF_LINK.sub(lambda m: f"`{_shown(m.group(1), m.group(2))}`", text)
    text = _RST_LITERAL.sub(":", text)  # reST "Example::" introduces a literal block, shown as "Example:"
    return _HF_PARAMETER.sub(lambda m: f"{m.group('indent')}{m.group('name')}:", text)


class TrlDocstrings(griffe.Extension):
    """Rewrites every docstring once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_docstring(obj.docstring.value)
