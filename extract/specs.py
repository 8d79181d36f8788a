"""Parsing of the source spellings shared by models and datasets.

A spec is ``HEAD?key=value&key=value``: the head names the source, the query
holds keyword arguments. Values are Python literals when they parse as one
(``depth=3``, ``pretrained=False``; ``true``, ``false`` and ``none`` in any
case too, as in YAML), strings otherwise.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from urllib.parse import parse_qsl

from ckapipe.errors import MissingExtra, SpecError, suggest


def split_spec(spec: str) -> tuple[str, dict]:
    """``"torchvision:resnet18?weights=none"`` -> ``("torchvision:resnet18", {"weights": "none"})``."""
    head, _, query = spec.partition("?")
    params = {key: literal(value) for key, value in parse_qsl(query, keep_blank_values=True)}
    return head, params


WORDS = {"true": True, "false": False, "none": None, "null": None}


def literal(text: str):
    """A Python literal when ``text`` is one (``true``/``false``/``none`` in any case too), else the text itself."""
    if text.lower() in WORDS:
        return WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def int_param(params: dict, key: str, default: int, what: str) -> int:
    """``params[key]`` as an integer (``default`` when absent), or a one-line error naming the spec."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what}: {key}={value!r} is not an integer")
    return value


def call_factory(factory, params: dict, what: str):
    """``factory(**params)``, refusing a keyword it does not take with a one-line error naming the ones it does."""
    check_params(factory, params, what)
    return factory(**params)


def check_params(factory, params: dict, what: str) -> None:
    """A one-line error for keywords ``factory`` does not take (nothing when it takes ``**kwargs``)."""
    names = keywords(factory)
    if names is None:
        return
    for key in params:
        if key not in names:
            takes = f"its parameters are {', '.join(names)}" if names else "it takes no parameters"
            raise SpecError(f"{what} takes no parameter {key!r}{suggest(key, names)} ({takes})")


def takes_keyword(factory, name: str) -> bool:
    names = keywords(factory)
    return names is None or name in names


def keywords(factory) -> list[str] | None:
    """The keyword parameters of a callable; None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and C callables: let the call decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return None
    return [n for n, p in accepted.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def require(module: str, extra: str):
    """Import an optional dependency, or explain which ckapipe extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{module} is not installed: install ckapipe's {extra!r} extra (pip install 'ckapipe[{extra}]', "
            f"or pip install -e '.[{extra}]' in a clone)"
        ) from None


def import_object(path: str, what: str):
    """Resolve ``package.module:attr`` to the object; a SpecError says what is missing."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SpecError(f"{what} {path!r} is not of the form package.module:name")
    search_cwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise SpecError(f"{what} {path!r}: module {err.name!r} not found (searched the current directory and PYTHONPATH)") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{what} {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{what} {path!r} is not callable")
    return obj


def module_exists(name: str) -> bool:
    """True when ``name`` is an importable module (without importing it)."""
    search_cwd()
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def search_cwd() -> None:
    """Let ``package.module:name`` specs find modules in the current directory, as ``python -m`` does.

    The ``ckapipe`` console script does not put the current directory on
    ``sys.path``; a user's own factory next to their study file should still import.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def looks_importable(head: str) -> bool:
    """True for ``package.module:name`` heads whose module part is a dotted Python name."""
    module_name, sep, attr = head.partition(":")
    return bool(sep and attr) and all(p.isidentifier() for p in module_name.split(".")) and all(
        p.isidentifier() for p in attr.split(".")
    )
