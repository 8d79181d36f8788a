"""ckapipe: minibatch CKA at scale. Extract activations once, compare any pairing offline.

The API, imported lazily (``import ckapipe.analyze`` never imports torch)::

    from ckapipe import compare, extract_run, analyze, load_results, plot_results, run_study

    res = compare("zoo:cnn3?seed=0", "zoo:cnn3?seed=1", "digits")   # one pass, nothing cached
    path = extract_run("zoo:cnn3?seed=0", "digits", cache="cache", batch_size=64)
    results = analyze("cache", ["cnn3-seed0@digits", "cnn3-seed1@digits"], out="results/seeds")

The floor under both stages lives here too: ``ckapipe.store`` (the cache
layout), ``ckapipe.kernels`` (Gram, U-centering, HSIC, CKA), ``ckapipe.errors``.
"""

from __future__ import annotations

import importlib

from ckapipe.errors import MissingExtra

__version__ = "0.1.0"

API = {
    "compare": "ckapipe.pipelines.compare",
    "extract_run": "ckapipe.extract.runner",
    "list_layers": "ckapipe.extract.runner",
    "analyze": None,  # the package ckapipe.analyze, which is callable as the function
    "load_results": "ckapipe.analyze.results",
    "Results": "ckapipe.analyze.results",
    "plot_results": "ckapipe.analyze",
    "run_study": "ckapipe.pipelines.api",
    "load_study": "ckapipe.pipelines.study",
}

EXTRAS = {"torch": "torch"}  # an optional package the API may need -> the extra that installs it

__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name == "analyze":
        return importlib.import_module("ckapipe.analyze")
    if name in API:
        return getattr(api_module(name), name)
    raise AttributeError(f"module 'ckapipe' has no attribute {name!r}")


def api_module(name: str):
    """The module behind API name ``name``; a missing optional package is one line naming its extra
    (``MissingExtra``, an ImportError too), not a bare ModuleNotFoundError from deep inside."""
    try:
        return importlib.import_module(API[name])
    except ModuleNotFoundError as err:
        package = (err.name or "").partition(".")[0]
        if package not in EXTRAS:
            raise
        raise MissingExtra(f"{name} needs {package}: pip install 'ckapipe[{EXTRAS[package]}]'") from None


def __dir__():
    return sorted(__all__)
