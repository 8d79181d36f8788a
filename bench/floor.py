"""The analysis against its floor, alone, for before/after comparisons of analysis changes:

    python -m bench.floor [--cache /tmp/ckapipe-floor] [--n 2560] [--size 32] [--rounds 3]

extracts W1's two runs once into ``--cache`` (kept for the next call), then prints,
round by round, wall and CPU seconds of the bare read of every chunk (each array
opened once, Dask threads), the float64 analysis and the float32-products analysis.
To time an older commit's analysis on the same stores: ``git worktree add /tmp/old
COMMIT`` and run this with ``PYTHONPATH=/tmp/old:.`` (its ``analyze`` is then imported).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.__main__ import PAIR
from bench.workloads import Study, analysis, decoded_read, extract_all


def wall_and_cpu(fn) -> str:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return f"{time.perf_counter() - wall:6.2f} s wall {time.process_time() - cpu:6.2f} s cpu"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/tmp/ckapipe-floor")
    parser.add_argument("--n", type=int, default=2560)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    runs = extract_all(Study("floor", PAIR, args.n, args.size), cache)  # a cache hit after the first call
    names = [r.name for r in runs]
    for _ in range(args.rounds):
        print(f"bare read {wall_and_cpu(lambda: decoded_read(cache, names))} | "
              f"analysis {wall_and_cpu(lambda: analysis(cache, names, 'cpu', use_gram_cache=False))} | "
              f"float32 products {wall_and_cpu(lambda: analysis(cache, names, 'cpu', use_gram_cache=False, precision='float32'))}",
              flush=True)


if __name__ == "__main__":
    main()
