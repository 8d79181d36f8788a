"""Globs over names made of components: layer names (``layer1.0.conv1``) and run names (``cnn3-s0@digits``).

A name splits into components at its separators (``.`` for layers; ``-``, ``@`` and ``.`` for runs).
``*`` and ``?`` stay within one component, ``**`` crosses separators, ``[...]`` is a character class.
With ``whole_words``, the literal text next to a wildcard must be a whole word of the name (a word:
a run of letters or a run of digits), so ``cnn3-s*`` matches ``cnn3-s0`` and not ``cnn3-seed0``.
With ``leading`` (run names), the pattern may stop before the name's last components, and a ``*``
standing alone as a component (``*-1a2b``, ``cnn3-*``) stands for any number of components.
"""

from __future__ import annotations

import fnmatch
import functools
import re

LAYER_SEPARATORS = "."
RUN_SEPARATORS = "-@."
_WORDS = {"letter": "[A-Za-z]", "digit": "[0-9]"}


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def glob_match(pattern: str, name: str, separators: str = LAYER_SEPARATORS, whole_words: bool = False,
               leading: bool = False) -> bool:
    """Whether ``pattern`` matches ``name`` component by component (see the module docstring)."""
    return glob_regex(pattern, separators, whole_words, leading).fullmatch(name) is not None


@functools.lru_cache(maxsize=512)
def glob_regex(pattern: str, separators: str, whole_words: bool, leading: bool) -> re.Pattern:
    sep = re.escape(separators)
    tokens = [t for t in re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern) if t]
    parts = []
    for i, token in enumerate(tokens):
        wild = {"**": ".*", "*": f"[^{sep}]*", "?": f"[^{sep}]"}.get(token)
        if leading and token == "*" and _alone(tokens, i, separators):
            wild = ".*"
        if wild is None:
            is_class = token.startswith("[") and token.endswith("]") and len(token) > 2
            parts.append(fnmatch.translate(token)[4:-3] if is_class else re.escape(token))
            continue
        before = _word_class(tokens[i - 1][-1]) if whole_words and i > 0 else None
        after = _word_class(tokens[i + 1][0]) if whole_words and i + 1 < len(tokens) else None
        parts.append((f"(?!{before})" if before else "") + wild + (f"(?<!{after})" if after else ""))
    tail = f"(?:[{sep}].*)?" if leading else ""
    return re.compile("".join(parts) + tail)


def _alone(tokens: list[str], i: int, separators: str) -> bool:
    """Whether token i is a whole component: at an end of the pattern or next to a separator on both sides."""
    return ((i == 0 or tokens[i - 1][-1] in separators)
            and (i + 1 == len(tokens) or tokens[i + 1][0] in separators))


def _word_class(char: str) -> str | None:
    """The class of the word a literal character belongs to (letters or digits); None for others."""
    if char.isascii() and char.isalpha():
        return _WORDS["letter"]
    if char.isdigit():
        return _WORDS["digit"]
    return None
