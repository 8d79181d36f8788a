"""Analysis benchmark, every number measured in one run on the same features.

ResNet-18 vs ResNet-34 (random init, every residual-block output), N inputs of
3 × 32 × 32, minibatch 256:

1. ckapipe's analysis against torch-cka 0.21's ``compare`` (which reruns both
   models; its time is reported with and without ckapipe's extraction added);
2. the analysis against a bare read of the same arrays (same Dask threads and
   chunk groups, no arithmetic): target <= 1.3x;
3. a re-analysis from the cached Grams against the first: target >= 10x;
4. accuracy: torch-cka's float32 HSIC (as shipped) and ckatorch, against
   ckapipe, on features with a constant offset added.

    python -m tests.bench.bench_analyze [--n 10240] [--out bench-results/analyze]

torchvision's ResNets are used when torchvision imports; otherwise the same
architecture built here (BasicBlock ResNets, torchvision's layout and init), and
the output says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import analyze
from analyze.engine import plan_analysis, task_groups
from analyze.grams import checked_chunk
from extract import store

BATCH = 256
SEED = 0


# --------------------------------------------------------------------------- models


def resnets():
    """(name, module, residual-block names) for ResNet-18 and ResNet-34, random init, eval mode."""
    import torch

    torch.manual_seed(SEED)
    try:
        from torchvision.models import resnet18, resnet34

        source = "torchvision"
        nets = [("resnet18", resnet18()), ("resnet34", resnet34())]
    except ImportError:
        source = "bench's own BasicBlock ResNets (torchvision's layout and init; torchvision not importable)"
        nets = [("resnet18", basic_resnet([2, 2, 2, 2])), ("resnet34", basic_resnet([3, 4, 6, 3]))]
    out = []
    for name, net in nets:
        blocks = [n for n, _ in net.named_modules() if n.count(".") == 1 and n.startswith("layer")]
        out.append((name, net.eval(), blocks))
    return source, out


def basic_resnet(depths):
    """torchvision's ResNet with BasicBlocks (He et al. 2016), its kaiming init."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes = 64
            for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
                stride = 1 if i == 0 else 2
                blocks = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes, 1) for _ in range(depth - 1)]
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
                inplanes = planes
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 1000)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet()


# --------------------------------------------------------------------------- features


def extract(cache, name, net, blocks, inputs):
    """Residual-block outputs (flattened) into a run store, one chunk per minibatch of 256."""
    import torch

    features = {}
    hooks = [net.get_submodule(b).register_forward_hook(lambda mod, i, o, b=b: features.__setitem__(b, o.flatten(1)))
             for b in blocks]
    with torch.no_grad():
        net(inputs[:2])
    infos = {b: store.LayerInfo(int(features[b].shape[1]), tuple(features[b].shape[1:])) for b in blocks}
    spec = store.RunSpec(
        model=f"bench:{name}", weights_hash=f"seed{SEED}", dataset=f"randn:{len(inputs)}x3x32x32", transform="none",
        order_seed=0, batch_size=BATCH, layers=tuple(store.LayerSpec(b) for b in blocks), name=name,
    )
    run = store.create_run(cache, spec, np.arange(len(inputs)), infos, compressors=store.compressors("blosc-lz4"))
    with torch.no_grad():
        for k in range(run.n_chunks):
            net(inputs[run.chunk_slice(k)])
            run.write_chunk(k, {b: features[b].numpy() for b in blocks})
    run.refresh_status()
    for h in hooks:
        h.remove()
    return run


def bare_read(cache, names):
    """Read every chunk the analysis reads, in the same Dask task groups and threads, and nothing else."""
    import dask

    plan = plan_analysis(cache, names, use_gram_cache=False)
    m = plan.pairing.m
    groups = task_groups(plan.pairing.minibatches, m, [r.batch_size for r in plan.runs])

    def read(ks):
        total = 0
        for source in plan.sources:
            run = store.open_run(source.path)
            for layer in source.layers:
                for j in sorted({k * m // run.batch_size for k in ks}):
                    total += checked_chunk(run, layer, j).nbytes
        return total

    return sum(dask.compute(*[dask.delayed(read)(ks) for ks in groups], scheduler="threads"))


class Seconds(float):
    """Wall seconds, with the process's CPU seconds (all threads) in ``.cpu``: on a shared
    machine the CPU time is the steadier measure of the work done."""

    def __new__(cls, wall, cpu):
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj

    def __str__(self):
        return f"{float(self):7.2f} s wall {self.cpu:7.2f} s cpu"


def timed(fn, repeat=1):
    """Best of ``repeat`` runs (by wall time): (Seconds, value)."""
    best, value = None, None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        took = Seconds(time.perf_counter() - wall, time.process_time() - cpu)
        best = took if best is None or took < best else best
    return best, value


def ratio(a: Seconds, b: Seconds) -> str:
    return f"{a / b:5.2f}x wall {a.cpu / b.cpu:5.2f}x cpu"


# --------------------------------------------------------------------------- anchors


def torch_cka_compare(nets, inputs):
    """torch-cka 0.21 as shipped (float32): compare over the same minibatches."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    (n1, m1, b1), (n2, m2, b2) = nets
    loader = DataLoader(TensorDataset(inputs, torch.zeros(len(inputs))), batch_size=BATCH, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anchor = CKA(m1, m2, n1, n2, model1_layers=b1, model2_layers=b2)
        with torch.no_grad():
            anchor.compare(loader)
    return anchor.export()["CKA"].numpy().astype(np.float64)


def offset_deviation(x, y, offsets):
    """Max |CKA - exact| over minibatches of (x + c, y + c): torch-cka float32, ckatorch, ckapipe."""
    import torch
    from ckatorch import cka_batch
    from torch_cka.cka import CKA

    from analyze.kernels import cka, hsic1_matrix, ucentered_gram

    class Device:
        device = "cpu"

    def ckapipe_cka(a, b):
        s = sum(hsic1_matrix(np.stack([ucentered_gram(a[k:k + BATCH]), ucentered_gram(b[k:k + BATCH])]))
                for k in range(0, len(a) - BATCH + 1, BATCH))
        return float(cka(s[:1, 1:], s[:1, 0], s[1:, 1])[0, 0])

    def torch_cka(a, b):
        s = np.zeros(3)
        for k in range(0, len(a) - BATCH + 1, BATCH):
            ta, tb = torch.from_numpy(a[k:k + BATCH]), torch.from_numpy(b[k:k + BATCH])
            K, L = ta @ ta.T, tb @ tb.T
            K.fill_diagonal_(0)
            L.fill_diagonal_(0)
            s += [CKA._HSIC(Device, K, L), CKA._HSIC(Device, K, K), CKA._HSIC(Device, L, L)]
        with np.errstate(invalid="ignore", divide="ignore"):
            return s[0] / np.sqrt(s[1] * s[2])

    from tests._analyze_stores import minibatch_cka_reference

    rows = []
    for c in offsets:
        a, b = (x + c).astype(np.float32), (y + c).astype(np.float32)
        # exact CKA of these float32 values: the float64 formula on them minus c (exact in float64), no cancellation
        exact = minibatch_cka_reference(a.astype(np.float64) - c, b.astype(np.float64) - c, BATCH)
        batched = [torch.from_numpy(v[: len(v) // BATCH * BATCH]).reshape(-1, BATCH, v.shape[1]) for v in (a, b)]
        rows.append({
            "offset": c,
            "exact": exact,
            "torch_cka_float32": abs(torch_cka(a, b) - exact),
            "ckatorch": abs(cka_batch(*batched).item() - exact),
            "ckapipe": abs(ckapipe_cka(a, b) - exact),
        })
    return rows


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=int(os.environ.get("CKAPIPE_BENCH_N", 10240)), help="inputs (multiple of 256)")
    parser.add_argument("--out", default="bench-results/analyze")
    parser.add_argument("--no-torch-cka", action="store_true", help="skip torch-cka's compare (slow on CPU)")
    args, _ = parser.parse_known_args(argv)  # tolerate the arguments of tests.bench when run from there
    n = args.n // BATCH * BATCH

    source, nets = resnets()
    print(f"# ckapipe analysis bench, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}; device: cpu; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"models: ResNet-18 vs ResNet-34 from {source}, random init (seed {SEED}), "
          f"{len(nets[0][2])} + {len(nets[1][2])} residual-block outputs")
    print(f"inputs: {n} x 3 x 32 x 32 (randn), minibatch {BATCH}" + ("" if n == 10240 else f"  [N reduced from 10240 to {n}]"))
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(n, 3, 32, 32, generator=generator)

    workdir = Path(tempfile.mkdtemp(prefix="ckapipe-bench-analyze-"))
    numbers = {"machine": machine(), "models": source, "n": n, "batch": BATCH}
    try:
        cache = workdir / "cache"
        t_extract, runs = timed(lambda: [extract(cache, name, net, blocks, inputs) for name, net, blocks in nets])
        names = [r.name for r in runs]
        size = sum(store.disk_size(r.path) for r in runs) if hasattr(store, "disk_size") else 0
        raw = sum(r.layer(layer).nbytes for r in runs for layer in r.layer_names)
        print(f"extraction (bench's own hook loop, blosc-lz4): {t_extract}; {raw / 1e9:.2f} GB float32, {size / 1e9:.2f} GB on disk")

        def run(**options):
            return analyze.analyze(cache, names, progress=False, **options)

        t_read, nbytes = timed(lambda: bare_read(cache, names), repeat=2)
        t_plain, plain = timed(lambda: run(use_gram_cache=False), repeat=2)
        t_fast, fast = timed(lambda: run(use_gram_cache=False, precision="float32"), repeat=2)
        t_first, first = timed(lambda: run())
        t_again, again = timed(lambda: run(), repeat=2)
        assert np.allclose(again.hsic, first.hsic, rtol=1e-12) and np.allclose(plain.hsic, first.hsic, rtol=1e-12)
        fast_error = float(np.nanmax(np.abs(fast.cka_all - plain.cka_all)))
        numbers.update({k: {"wall_s": float(v), "cpu_s": v.cpu} for k, v in dict(
            extract=t_extract, bare_read=t_read, analysis_float64=t_plain, analysis_float32=t_fast,
            first_analysis_filling_grams=t_first, analysis_from_grams=t_again).items()})
        numbers["float32_max_abs_cka_diff"] = fast_error
        numbers["load_average"] = os.getloadavg()[0]
        print(f"load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes may share them)")
        print(f"bare read of the same arrays:            {t_read} ({nbytes / 1e9:.2f} GB decoded)")
        print(f"analysis, float64 (no Gram cache):       {t_plain}  {ratio(t_plain, t_read)} the bare read (target <= 1.3x)")
        print(f"analysis, float32 products (no cache):   {t_fast}  {ratio(t_fast, t_read)} the bare read; "
              f"max |CKA - float64| {fast_error:.1e}")
        print(f"first analysis, filling the Gram cache:  {t_first}  {ratio(t_first, t_read)} the bare read")
        print(f"re-analysis from cached Grams:           {t_again}  first / this: {ratio(t_first, t_again)} (target >= 10x)")

        if not args.no_torch_cka:
            t_anchor, theirs = timed(lambda: torch_cka_compare(nets, inputs))
            ours = plain.cka(names[0], names[1])
            numbers["torch_cka_compare"] = {"wall_s": float(t_anchor), "cpu_s": t_anchor.cpu}
            numbers["torch_cka_max_abs_diff"] = float(np.abs(theirs - ours).max())
            print(f"torch-cka 0.21 compare (float32):        {t_anchor}")
            print(f"  torch-cka / analysis float64:          {ratio(t_anchor, t_plain)} (target >= 10x)")
            print(f"  torch-cka / analysis float32 products: {ratio(t_anchor, t_fast)}")
            print(f"  torch-cka / re-analysis from Grams:    {ratio(t_anchor, t_again)}")
            both = Seconds(t_extract + t_plain, t_extract.cpu + t_plain.cpu)
            print(f"  torch-cka / (extraction + analysis):   {ratio(t_anchor, both)}")
            print(f"  max |CKA torch-cka - ckapipe| on these features: {np.abs(theirs - ours).max():.2e}")

        x = runs[0].layer(runs[0].layer_names[-1])[:2048].astype(np.float64)
        y = runs[1].layer(runs[1].layer_names[-1])[:2048].astype(np.float64)
        rows = offset_deviation(x, y, [0.0, 1e2, 1e3, 1e4])
        numbers["offset_deviation"] = rows
        print(f"accuracy, {runs[0].layer_names[-1]} vs {runs[1].layer_names[-1]}, 2048 inputs, float32 features + offset; "
              f"|CKA - exact CKA of the same float32 values|:")
        print(f"  {'offset':>8} {'exact':>9} {'torch-cka f32':>14} {'ckatorch':>10} {'ckapipe':>10}")
        for row in rows:
            print(f"  {row['offset']:>8g} {row['exact']:>9.6f} {row['torch_cka_float32']:>14.2e} {row['ckatorch']:>10.2e} "
                  f"{row['ckapipe']:>10.2e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_analyze.json").write_text(json.dumps(numbers, indent=1))
    print(f"numbers: {out / 'bench_analyze.json'}")
    return numbers


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
