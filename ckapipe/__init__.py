"""ckapipe: minibatch CKA at scale. Extract activations once, compare any pairing offline.

The API::

    from ckapipe import compare, extract_run, analyze, load_results, plot_results, run_study

    res = compare("zoo:cnn3?seed=0", "zoo:cnn3?seed=1", "digits")   # one pass, nothing cached
    path = extract_run("zoo:cnn3?seed=0", "digits", cache="cache", batch_size=64)
    results = analyze("cache", ["cnn3-seed0@digits", "cnn3-seed1@digits"], out="results/seeds")

``import ckapipe`` imports no torch: the names that run models (compare, extract_run, list_layers)
import it on first use, through the lazy boundary of their stage (docs/design.md, "Floors"); without
torch they fail in one line naming the extra to install. The floor under both stages lives here too:
``ckapipe.store`` (the cache layout), ``ckapipe.kernels`` (Gram, U-centering, HSIC, CKA), ``ckapipe.errors``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ckapipe import analyze, extract  # noqa: E402 - analyze: the package, callable as the function
from ckapipe.analyze import Results, load_results, plot_results  # noqa: E402
from ckapipe.errors import MissingExtra  # noqa: E402
from ckapipe.pipelines import api as study_api  # noqa: E402
from ckapipe.pipelines.api import load_study, run_study  # noqa: E402

NEED_TORCH = {"compare": study_api, "extract_run": extract, "list_layers": extract}  # name -> the module that has it
EXTRAS = {"torch": "torch"}  # an optional package the API may need -> the extra that installs it

__all__ = ["__version__", "compare", "extract_run", "list_layers", "analyze", "load_results", "Results",
           "plot_results", "run_study", "load_study"]


def __getattr__(name: str):
    """A name of NEED_TORCH from its module; a missing optional package is one line naming its extra
    (``MissingExtra``, an ImportError too), not a bare ModuleNotFoundError from deep inside."""
    if name not in NEED_TORCH:
        raise AttributeError(f"module 'ckapipe' has no attribute {name!r}")
    try:
        return getattr(NEED_TORCH[name], name)
    except ModuleNotFoundError as err:
        package = (err.name or "").partition(".")[0]
        if package not in EXTRAS:
            raise
        raise MissingExtra(f"{name} needs {package}: pip install 'ckapipe[{EXTRAS[package]}]'") from None


def __dir__():
    return sorted(__all__)
