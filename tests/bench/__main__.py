"""``python -m tests.bench`` (``make bench``): every benchmark, extraction first.

Each ``tests/bench/bench_*.py`` module exposes ``main()``, which measures, prints
its numbers and writes them under ``bench-results/``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

FIRST = "bench_extract"


def bench_modules() -> list[str]:
    """Names of the bench modules in this folder, extraction first, then alphabetical."""
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    return sorted(names, key=lambda name: (name != FIRST, name))


def main() -> int:
    for name in bench_modules():
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"tests.bench.{name}").main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
