"""``python -m bench`` (``make bench``): issue 5's workloads, one table.

    python -m bench [--full] [--only W1,W3] [--device cpu|cuda] [--out bench-results]

Every row compares two things measured in this run, as a ratio. The table is
printed and written to bench-results/bench.{json,md}; a run of the whole suite
also rewrites the "Latest run" section of docs/benchmarks.md. The exit status is 1 when
ckapipe itself errors or deviates from float64 by more than 1e-6 (another tool's
error or NaN is a result, printed in its row).

Without ``--full`` (or CKAPIPE_BENCH_FULL=1) the sizes are reduced so that the
suite ends in about 15 minutes on a 2-core CPU; ``--full`` is issue 5's sizes,
for a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import shutil
import tempfile
from pathlib import Path

from bench.common import machine, markdown, print_row, require_torchvision, write_table
from bench.report import write_docs

FULL = {"G": 10240, "M": 10240, "U": 10240, "W1": 10240, "W2": 2560, "W3": 10240, "W4": [2560, 5120, 10240, 20480],
        "F1": 10240, "F2": 2560, "F3": 10240, "F4": [2560, 5120, 10240, 20480], "F5": 10240}
REDUCED = {"G": 2560, "M": 2560, "U": 2560, "W1": 5120, "W2": 512, "W3": 2048, "W4": [2560, 5120, 10240, 20480],
           "F1": 2048, "F2": 256, "F3": 1024, "F4": [1024, 8192], "F5": 2048}
ALL = "C,E,K,A,G,M,U,W1,W2,W3,W4,F1,F2,F3,F4,F5"  # the whole suite: a run of all of it rewrites docs/benchmarks.md
COMPARE_TARGETS = {"cpu": (">= 1.3", ">= 8"), "cuda": (">= 3", ">= 10")}  # compare vs torch-cka, W1 and W3 (issue 10)
PAIR = (("resnet18", "resnet18", 0), ("resnet34", "resnet34", 0))
TWINS = (("resnet18", "resnet18", 0), ("resnet18-seed1", "resnet18", 1))  # pytorch-cka's own example (issue 21)
SIX = (("resnet18", "resnet18", 0), ("resnet34", "resnet34", 0), ("resnet50", "resnet50", 0),
       ("wide_resnet50_2", "wide_resnet50_2", 0), ("resnet18-seed1", "resnet18", 1), ("resnet18-seed2", "resnet18", 2))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", default=os.environ.get("CKAPIPE_BENCH_FULL") == "1",
                        help="issue 5's sizes (N = 10,240; W2 2,560 at 224 px): for a GPU machine")
    parser.add_argument("--only", default=ALL,
                        help="comma-separated pieces: C (codecs), E (extraction vs forward, digits), K (checksums), "
                             "A (float32 accuracy against an offset), G (Grams filled at extraction), "
                             "M (each measure from cached Grams against linear CKA), "
                             "U (intervals and p-values against the analysis from cached Grams), W1..W4, "
                             "F1..F5 (compare end to end: W1, W2, W3 and W5 speed against the forward passes, pytorch-cka "
                             "and torch-cka; W1, W2 and W5 accuracy; W4 memory)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default="bench-results")
    return parser.parse_args(argv)


def pieces(sizes: dict, device: str, workdir: Path) -> dict:
    """Each piece of the suite: a callable returning its rows."""
    from bench.accuracy import offset_rows
    from bench.bench_extract import compression_rows, extraction_rows
    from bench.checksums import checksum_rows
    from bench.front import accuracy_rows, front_rows, memory_rows
    from bench.grams import gram_rows
    from bench.measures import measure_rows
    from bench.uncertainty import uncertainty_rows
    from bench.workloads import Study, run_study, scaling

    two, six = COMPARE_TARGETS[device]

    return {
        "C": lambda: compression_rows(workdir / "C"),
        "E": lambda: extraction_rows(workdir / "E"),
        "K": lambda: checksum_rows(workdir),
        "A": lambda: offset_rows(workdir / "A"),
        "G": lambda: gram_rows(Study("G", PAIR, sizes["G"], 32, device), workdir),
        "M": lambda: measure_rows(Study("M", PAIR, sizes["M"], 32, device), workdir),
        "U": lambda: uncertainty_rows(Study("U", PAIR, sizes["U"], 32, device), workdir,
                                      permutations=1000 if sizes is FULL else 200),
        "W1": lambda: run_study(Study("W1", PAIR, sizes["W1"], 32, device), workdir),
        "W2": lambda: run_study(Study("W2", PAIR, sizes["W2"], 224, device, rounds=1), workdir),
        "W3": lambda: run_study(Study("W3", SIX, sizes["W3"], 32, device, end_to_end_target=">= 10"), workdir),
        "W4": lambda: scaling(Study("W4", PAIR, 0, 32, device), sizes["W4"], workdir),
        "F1": lambda: (front_rows(Study("W1", PAIR, sizes["F1"], 32, device, end_to_end_target=two))
                       + accuracy_rows(Study("W1", PAIR, sizes["F1"], 32, device), workdir)),
        "F2": lambda: (front_rows(Study("W2", PAIR, sizes["F2"], 224, device, end_to_end_target=two, rounds=1))
                       + accuracy_rows(Study("W2", PAIR, sizes["F2"], 224, device), workdir)),
        "F3": lambda: front_rows(Study("W3", SIX, sizes["F3"], 32, device, end_to_end_target=six), torch_cka_rounds=1,
                                 target="<= 1.15"),
        "F4": lambda: memory_rows(Study("W4", PAIR, 0, 32, device), sizes["F4"], workdir),
        "F5": lambda: (front_rows(Study("W5", TWINS, sizes["F5"], 32, device), with_torch_cka=False)
                       + accuracy_rows(Study("W5", TWINS, sizes["F5"], 32, device), workdir)),
    }


def main(argv=None) -> int:
    require_torchvision()
    args = parse(argv)
    sizes = FULL if args.full else REDUCED
    header = machine(args.device) | {"sizes": "full (issue 5)" if args.full else f"CPU: reduced N {sizes}"}
    for key, value in header.items():
        print(f"{key}: {value}")
    if not args.full:
        print(f"CPU: reduced N (W1 {sizes['W1']}, W2 {sizes['W2']} at 224 px, W3 {sizes['W3']}, W4 {sizes['W4']}); "
              f"--full for issue 5's sizes", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="ckapipe-bench-"))
    rows = []
    try:
        for name, piece in pieces(sizes, args.device, workdir).items():
            if name in args.only.split(","):
                print(f"\n== {name}", flush=True)
                new = piece()
                for row in new:
                    print_row(row)
                rows += new
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + markdown(rows))
    write_table(rows, header, Path(args.out))
    if set(args.only.split(",")) >= set(ALL.split(",")):
        print(f"docs: {write_docs(rows, header)} (section 'Latest run')")
    failed = [r for r in rows if r.ckapipe_failure]
    for r in failed:
        print(f"FAILED: [{r.workload}] {r.what}: {r.note or r.a}", file=sys.stderr)
    print(f"table: {Path(args.out) / 'bench.md'}, {Path(args.out) / 'bench.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
