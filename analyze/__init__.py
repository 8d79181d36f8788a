"""Stage 2 of ckapipe, ``ckapipe.analyze``: minibatch CKA over cached runs with Dask
(NumPy or CuPy). Runs without torch::

    from ckapipe import analyze                  # this package; calling it calls analyze.analyze
    results = analyze("cache", ["resnet18@cifar10", "resnet34@cifar10"], out="results/depth")
    results.cka                                  # DataArray (layer_a, layer_b): resnet18's layers x resnet34's
    plot_results("results/depth")
    results.interval("resnet18@cifar10", "resnet34@cifar10")   # its bootstrap interval, (bound, layer_a, layer_b)
    diff("results/depth", a=("resnet18@cifar10:layer4", "resnet34@cifar10:layer4"),
         b=("resnet18@cifar10:layer3", "resnet34@cifar10:layer4"))   # CKA(a) - CKA(b), paired
"""

if __name__ != "ckapipe.analyze":  # this folder is installed as ckapipe.analyze, never as a top-level module
    raise ImportError(f"the folder analyze/ is the package ckapipe.analyze: import ckapipe.analyze, not {__name__}")

import inspect  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from ckapipe.analyze import plots  # noqa: E402
from ckapipe.analyze.engine import analyze, is_up_to_date, plan_analysis  # noqa: E402
from ckapipe.analyze.results import Results, load_results  # noqa: E402
from ckapipe.analyze.uncertainty import diff, permutation_test  # noqa: E402
from ckapipe.analyze.views import plot_view, read_view  # noqa: E402


def plot_results(results_or_path, out_dir=None, **options):
    """Heatmaps and per-minibatch CKA views (``ckapipe.analyze.plots.plot_results``) of Results or a
    results directory; for results that keep a study's view (an ensemble, a teacher and students:
    ``ckapipe.analyze.views``), that view's figures, unless ``pair`` or ``layers`` ask for one pair's."""
    path = results_or_path.path if isinstance(results_or_path, Results) else results_or_path
    if path is not None and not (options.get("pair") or options.get("layers")) and read_view(path) is not None:
        return plot_view(results_or_path, None, out_dir)
    results = results_or_path if isinstance(results_or_path, Results) else load_results(results_or_path)
    return plots.plot_results(results, out_dir, **options)


class _CallablePackage(types.ModuleType):
    """``ckapipe.analyze`` names both this package and the API function ``analyze``
    (``from ckapipe import analyze``): calling the package calls the function."""

    def __call__(self, *args, **kwargs):
        return analyze(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
__signature__ = inspect.signature(analyze)

__all__ = ["analyze", "is_up_to_date", "plan_analysis", "load_results", "plot_results", "Results", "diff",
           "permutation_test"]
