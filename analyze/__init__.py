"""Stage 2 of ckapipe: minibatch CKA over cached runs with Dask (NumPy or CuPy).

Runs without torch::

    import analyze
    results = analyze.analyze("cache", ["resnet18@cifar10", "resnet34@cifar10"], out="results/depth")
    results.cka("resnet18@cifar10", "resnet34@cifar10")   # (La, Lb) CKA matrix
    print(results.summary())
    analyze.plot_results("results/depth")
"""

from analyze.engine import analyze, is_up_to_date, plan_analysis
from analyze.results import Results, load_results


def plot_results(results_or_path, out_dir=None, **options):
    """Heatmaps and per-minibatch CKA views as PNG and PDF; see ``analyze.plots.plot_results``."""
    from analyze.plots import plot_results as _plot

    return _plot(results_or_path, out_dir, **options)


__all__ = ["analyze", "is_up_to_date", "plan_analysis", "load_results", "plot_results", "Results"]
