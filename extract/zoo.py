"""The default study's networks: small CNNs and MLPs trained on digits.

scikit-learn's bundled digits (1797 images of 8 × 8 pixels) need no download,
so the default study compares real trained networks offline. Each network
trains in seconds on a CPU, deterministically from its seed, and is cached as
a state_dict under ``CACHE/models/`` so that later extractions (and the
weights hash in their run keys) reuse exactly the same weights.

Spec: ``zoo:NAME?seed=S`` with NAME in ``cnn2, cnn3, mlp2, mlp3``.
Every network's top-level children are the layers worth comparing:
``block1 .. blockD`` (the hidden stages) and ``head`` (the logits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckapipe.atomic import atomic_path
from ckapipe.errors import SpecError, suggest
from ckapipe.extract.specs import require

WIDTH = 32
EPOCHS = 20
TRAIN_BATCH = 64


def cnn(depth: int, width: int = WIDTH) -> nn.Module:
    """``depth`` conv blocks (3×3 conv, BatchNorm, ReLU), global average pool, linear head.

    Global pooling makes the network accept upscaled inputs too (the bench
    feeds it 32 × 32 digits).
    """
    blocks, channels = {}, 1
    for i in range(depth):
        blocks[f"block{i + 1}"] = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        channels = width
    blocks["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    return nn.Sequential(_ordered(blocks))


def mlp(depth: int, width: int = 2 * WIDTH) -> nn.Module:
    """``depth`` hidden blocks (linear, ReLU) on the flattened image, linear head."""
    blocks, features = {}, 64
    for i in range(depth):
        first = [nn.Flatten()] if i == 0 else []
        blocks[f"block{i + 1}"] = nn.Sequential(*first, nn.Linear(features, width), nn.ReLU())
        features = width
    blocks["head"] = nn.Linear(width, 10)
    return nn.Sequential(_ordered(blocks))


def _ordered(blocks: dict):
    from collections import OrderedDict

    return OrderedDict(blocks)


ARCHITECTURES = {
    "cnn2": lambda: cnn(2),
    "cnn3": lambda: cnn(3),
    "mlp2": lambda: mlp(2),
    "mlp3": lambda: mlp(3),
}


def build(name: str) -> nn.Module:
    """An untrained zoo network by name."""
    if name not in ARCHITECTURES:
        raise SpecError(f"no zoo network {name!r}{suggest(name, list(ARCHITECTURES))} (choose from {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]()


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 1, 8, 8) float32 in [0, 1] and their labels."""
    load_digits = require("sklearn.datasets", "demo").load_digits
    data = load_digits()
    x = torch.from_numpy((data.images / 16.0).astype(np.float32)).unsqueeze(1)
    return x, torch.from_numpy(data.target.astype(np.int64))


def train(name: str, seed: int) -> nn.Module:
    """Train a zoo network on digits from ``seed``: same seed, same weights.

    One intra-op thread: these networks are too small to gain from more, a
    thread pool fighting other work for 2 cores slows training tenfold, and a
    fixed thread count keeps the float reductions in one order.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(name, seed)
    finally:
        torch.set_num_threads(threads)


def _train(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build(name)
    x, y = digits_tensors()
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x), generator=order).split(TRAIN_BATCH):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def checkpoint_path(cache: str | os.PathLike, name: str, seed: int) -> Path:
    return Path(cache) / "models" / f"zoo-{name}-seed{seed}.pt"


def load(name: str, seed: int, cache: str | os.PathLike) -> nn.Module:
    """The trained network, from its cached checkpoint or trained now and cached."""
    path = checkpoint_path(cache, name, seed)
    model = build(name)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return model.eval()
    model = train(name, seed)
    with atomic_path(path, replace=True) as tmp:  # concurrent trainers never leave half a file
        torch.save(model.state_dict(), tmp)
    return model


def accuracy(model: nn.Module) -> float:
    """Training-set accuracy on digits (a sanity check that training worked)."""
    x, y = digits_tensors()
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())
