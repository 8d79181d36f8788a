"""What every piece of the bench shares: the machine, timing, rows of the one
table, the bare I/O baselines, the independent float64 CKA, the inputs and models."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BATCH = 256
TOLERANCE = 1e-6  # largest deviation from float64 that ckapipe may show
IO_BLOCK = 64 * 2**20


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """The machine a table was measured on."""
    import torch

    desc = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "memory_GB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "device": device,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "load_average": round(os.getloadavg()[0], 1),
    }
    if device == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc


# --------------------------------------------------------------------------- timing


def timed(fn, repeat: int = 1):
    """Best wall time of ``repeat`` calls, and the last value (or the exception it raised)."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - a failing tool is a result to print
            return time.perf_counter() - start, err
        best = min(best, time.perf_counter() - start)
    return best, value


# --------------------------------------------------------------------------- rows of the table


@dataclass
class Row:
    """One comparison: ``a`` against ``b``, measured in the same run; ratio = a / b."""

    workload: str
    what: str
    a_label: str
    a: float | None
    b_label: str
    b: float | None
    unit: str = "s"
    target: str = ""  # e.g. "<= 1.3", ">= 10"
    note: str = ""
    ckapipe_failure: bool = False  # makes the suite's exit status nonzero
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.a is None or self.b is None or self.b == 0 or not np.isfinite(self.a):
            return None
        return self.a / self.b

    @property
    def status(self) -> str:
        if self.note.startswith(("ERROR", "NaN")):
            return self.note.split(":")[0]
        if not self.target or self.ratio is None:
            return ""
        op, bound = self.target.split()
        ok = self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)
        return "met" if ok else "MISSED"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if not np.isfinite(value):
        return "NaN" if np.isnan(value) else "inf"
    if unit == "cka":
        return f"{value:.1e}"
    if unit == "s":
        return f"{value:.2f} s"
    return f"{value:,.0f} {unit}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2e}" if ratio < 0.01 or ratio >= 1e4 else f"{ratio:.2f}x"


def markdown(rows: list[Row]) -> str:
    lines = ["| W | comparison | a | b | a / b | target | status | note |", "|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        cells = [r.workload, r.what, f"{r.a_label}: {fmt(r.a, r.unit)}", f"{r.b_label}: {fmt(r.b, r.unit)}",
                 fmt_ratio(r.ratio), r.target, r.status, r.note]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def print_row(r: Row) -> None:
    print(f"  [{r.workload}] {r.what}: {r.a_label} {fmt(r.a, r.unit)} / {r.b_label} {fmt(r.b, r.unit)} = "
          f"{fmt_ratio(r.ratio)} {r.target} {r.status} {r.note}".rstrip(), flush=True)


def write_table(rows: list[Row], header: dict, out: Path) -> None:
    """bench-results/bench.json and bench.md."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": header, "rows": [asdict(r) | {"ratio": r.ratio, "status": r.status} for r in rows]}
    (out / "bench.json").write_text(json.dumps(data, indent=1, default=float))
    lines = [f"{k}: {v}" for k, v in header.items()]
    (out / "bench.md").write_text("\n".join(lines) + "\n\n" + markdown(rows) + "\n")


# --------------------------------------------------------------------------- bare I/O baselines


def bare_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially in 64 MiB blocks (what any writer must pay)."""
    block = np.random.default_rng(0).integers(0, 255, min(nbytes, IO_BLOCK), dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return time.perf_counter() - start


def bare_read_files(paths: list[Path]) -> tuple[float, int]:
    """Seconds to read every file under ``paths`` sequentially, and the bytes read."""
    files = [f for p in paths for f in sorted(Path(p).rglob("*")) if f.is_file()]
    start, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb") as handle:
            while chunk := handle.read(IO_BLOCK):
                total += len(chunk)
    return time.perf_counter() - start, total


# --------------------------------------------------------------------------- the independent float64 CKA


def reference_cka(runs, pairs) -> dict:
    """{(run_a, run_b): (La, Lb) CKA} from the stored activations, Song et al.'s HSIC_1
    with explicit traces in float64 (tests.reference), minibatch by minibatch."""
    from tests.reference import hsic1_reference

    grams_of = {}
    sums = {pair: None for pair in pairs}
    self_sums = {run.name: np.zeros(len(run.layer_names)) for run in runs}
    for k in range(runs[0].n_chunks):
        for run in runs:
            grams_of[run.name] = [_gram64(run.read_chunk(layer, k)) for layer in run.layer_names]
            self_sums[run.name] += [hsic1_reference(g, g) for g in grams_of[run.name]]
        for a, b in pairs:
            s = np.array([[hsic1_reference(ga, gb) for gb in grams_of[b]] for ga in grams_of[a]])
            sums[(a, b)] = s if sums[(a, b)] is None else sums[(a, b)] + s
    return {(a, b): s / np.sqrt(np.outer(self_sums[a], self_sums[b])) for (a, b), s in sums.items()}


def _gram64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x @ x.T


def max_deviation(theirs: np.ndarray, exact: np.ndarray) -> tuple[float, int]:
    """Largest |theirs - exact| over the finite entries, and how many entries are NaN or inf."""
    theirs = np.asarray(theirs, dtype=np.float64)
    bad = int((~np.isfinite(theirs)).sum())
    finite = np.isfinite(theirs)
    return (float(np.abs(theirs[finite] - exact[finite]).max()) if finite.any() else float("nan")), bad


# --------------------------------------------------------------------------- inputs and models


def bench_inputs(n: int = 2560, size: int = 32, seed: int = 0):
    """The bench's inputs: n × 3 × size × size from a seeded generator (a ckapipe dataset callable)."""
    import torch

    return torch.randn(int(n), 3, int(size), int(size), generator=torch.Generator().manual_seed(int(seed)))


def inputs_spec(n: int, size: int) -> str:
    return f"bench.common:bench_inputs?n={n}&size={size}"


def model_spec(arch: str, seed: int = 0) -> str:
    """A torchvision architecture with random weights drawn from ``seed`` (ckapipe's model spec)."""
    return f"torchvision:{arch}?weights=none&init_seed={seed}"


def require_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise SystemExit("the bench needs torchvision (random-init ResNets): run it with `make bench` "
                         "(it builds .venv-extras with torch and torchvision)") from None
