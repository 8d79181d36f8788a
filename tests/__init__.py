"""ckapipe's tests. Shared fixtures live in conftest.py; the float64 formulas in reference.py;
stores written from NumPy in numpy_runs.py; the models and datasets named by spec in spec_factories.py."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
