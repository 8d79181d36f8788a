"""A/B of two ckapipe commits on the first comparison and an extraction, in interleaved fresh processes.

    .venv-extras/bin/python -m bench.ab REV [ROUNDS] [N]        # REV against the working tree

Each side is built as a wheel and installed into its own folder (put first on PYTHONPATH), so both run
with the same torch, NumPy and BLAS. Each round runs, in a fresh process per side: two random-init
ResNet-18s at 32 px over N inputs in minibatches of 256 (pytorch-cka's own example), the forward passes
alone, ``compare`` of the two (``layer*.?``), one forward alone, and ``extract_run`` of one model. The
ratios to the forward passes of the same process are what is compared: a change that moves code
(issue 22) must leave them where they were. Best of the rounds, with the load average of each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ROUND = r'''
import json, os, tempfile, time, warnings
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18
from ckapipe import compare, extract_run

torch.manual_seed(0)
models = {"a": resnet18().eval(), "b": resnet18().eval()}
x = torch.randn(int(os.environ["AB_N"]), 3, 32, 32)
loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=256)
warnings.simplefilter("ignore")

def best(fn, n=2):
    times = []
    for _ in range(n):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)

def forward(nets):
    with torch.inference_mode():
        for xb, _ in loader:
            for net in nets:
                net(xb)

def extract():
    with tempfile.TemporaryDirectory() as cache:
        extract_run(models["a"], loader, ["layer*.?"], cache=cache, progress=False, data_name="x", device="cpu")

out = {"forward2": best(lambda: forward(models.values())),
       "compare": best(lambda: compare(models, loader, layers=["layer*.?"], device="cpu", progress=False)),
       "forward1": best(lambda: forward([models["a"]])), "extract": best(extract)}
print(json.dumps(out))
'''


def install(source: Path, into: Path) -> None:
    """``source`` (a tree) built as a wheel and installed, without dependencies, into the folder ``into``."""
    wheels = into.with_suffix(".wheel")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True)
    subprocess.run([*pip, "install", "--no-deps", "--target", into, *wheels.glob("*.whl")], check=True)


def one_round(folder: Path, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(folder), AB_N=str(n))
    proc = subprocess.run([sys.executable, "-c", ROUND], capture_output=True, text=True, env=env, cwd=folder.parent)
    if proc.returncode:
        raise SystemExit(f"{folder.name}: {proc.stderr.strip().splitlines()[-1]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"compare / forward": times["compare"] / times["forward2"],
            "extract_run / forward": times["extract"] / times["forward1"], "load": os.getloadavg()[0]}


def main(argv: list[str]) -> None:
    rev, rounds, n = argv[0], int(argv[1]) if len(argv) > 1 else 3, int(argv[2]) if len(argv) > 2 else 1024
    with tempfile.TemporaryDirectory(prefix="ckapipe-ab-") as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", REPO, "worktree", "add", "-q", "--detach", tmp / "tree", rev], check=True)
        try:
            sides = {rev: tmp / "a", "working tree": tmp / "b"}
            install(tmp / "tree", sides[rev])
            install(REPO, sides["working tree"])
            rows = {side: [] for side in sides}
            for r in range(rounds):
                for side, folder in sides.items():
                    rows[side].append(one_round(folder, n))
                    print(f"round {r}: {side}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[side][-1].items()), flush=True)
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tmp / "tree"], check=False)
    for side, results in rows.items():
        best = {k: min(r[k] for r in results) for k in ("compare / forward", "extract_run / forward")}
        print(f"{side}: best of {rounds}, N={n}: " + ", ".join(f"{k} {v:.3f}x" for k, v in best.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
