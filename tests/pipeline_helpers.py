"""Helpers for the tests of studies (pipelines/default.yaml is built once per run by the
``default_study`` fixture in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tests import REPO

DEFAULT = REPO / "pipelines" / "default.yaml"


def copy_models(source_cache: Path, cache: Path) -> None:
    """Reuse the trained zoo checkpoints (same weights, same run keys) in another cache."""
    shutil.copytree(source_cache / "models", cache / "models", dirs_exist_ok=True)


def assert_same_results(a: dict, b: dict, pairs) -> None:
    """Two runs of the study's comparisons agree pair by pair to float64 rounding."""
    for comparison, (run_a, run_b) in pairs:
        np.testing.assert_allclose(b[comparison].cka(run_a, run_b).values, a[comparison].cka(run_a, run_b).values,
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b[comparison].hsic_sum.values, a[comparison].hsic_sum.values, rtol=1e-10, atol=1e-14)


def study_pairs(study) -> list:
    return [(name, pair) for name, comparison in study.comparisons.items() for pair in comparison.pairs]
