"""The default study's networks: small CNNs and MLPs trained on digits.

scikit-learn's bundled digits (1797 images of 8 × 8 pixels) need no download,
so the default study compares real trained networks offline. Each network
trains in seconds on a CPU, deterministically from its seed, and is cached as
a state_dict under ``CACHE/models/`` so that later extractions (and the
weights hash in their run keys) reuse exactly the same weights.

Spec: ``zoo:NAME?seed=S`` with NAME in ``cnn2, cnn3, mlp2, mlp3``.
Every network's top-level children are the layers worth comparing:
``block1 .. blockD`` (the hidden stages) and ``head`` (the logits), selected by
``["block?", "head"]`` (the default, ``"*"``, takes every leaf module inside them).

Training checkpoints (for trajectory studies): ``zoo:NAME?seed=S&steps=T`` is
the network after T optimizer steps, and ``&teacher=NAME2`` trains it by
knowledge distillation from the zoo network NAME2 (seed 0, fully trained):
the same seed gives the same data order, so the checkpoints of one training
lie on one trajectory. ``save_checkpoints`` writes such a series as files.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
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
    epochs = EPOCHS * -(-len(digits_tensors()[0]) // TRAIN_BATCH)
    return next(_steps(name, seed, [epochs]))[1]


KD_TEMPERATURE, KD_WEIGHT = 4.0, 0.9  # Hinton et al. (2015): soft targets at T = 4, weighted 0.9 against the labels


def _steps(name: str, seed: int, steps, teacher: nn.Module | None = None):
    """(step, model) after each of the optimizer steps ``steps`` (increasing), training from ``seed``:
    Adam, minibatches of TRAIN_BATCH in a fresh permutation each epoch, cross-entropy, or with a
    ``teacher`` knowledge distillation (Hinton et al. 2015): KD_WEIGHT · T² · KL(teacher_T ‖ student_T)
    + (1 - KD_WEIGHT) · cross-entropy, T = KD_TEMPERATURE. The same model object, trained further."""
    torch.manual_seed(seed)
    model = build(name)
    x, y = digits_tensors()
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    targets = None
    if teacher is not None:
        with torch.no_grad():
            targets = nn.functional.log_softmax(teacher.eval()(x) / KD_TEMPERATURE, dim=1)
    wanted, done = sorted(set(int(s) for s in steps)), 0
    model.train()
    while wanted:
        for idx in torch.randperm(len(x), generator=order).split(TRAIN_BATCH):
            optimizer.zero_grad()
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            if targets is not None:
                soft = nn.functional.log_softmax(logits / KD_TEMPERATURE, dim=1)
                kl = nn.functional.kl_div(soft, targets[idx], log_target=True, reduction="batchmean")
                loss = KD_WEIGHT * KD_TEMPERATURE ** 2 * kl + (1 - KD_WEIGHT) * loss
            loss.backward()
            optimizer.step()
            done += 1
            if done == wanted[0]:
                wanted.pop(0)
                yield done, model.eval()
                model.train()
                if not wanted:
                    return
    return


def checkpoint_path(cache: str | os.PathLike, name: str, seed: int, steps: int | None = None,
                    teacher: str | None = None) -> Path:
    tail = (f"-steps{steps}" if steps is not None else "") + (f"-kd-{teacher}" if teacher else "")
    return Path(cache) / "models" / f"zoo-{name}-seed{seed}{tail}.pt"


def load(name: str, seed: int, cache: str | os.PathLike, steps: int | None = None, teacher: str | None = None) -> nn.Module:
    """The trained network (or its checkpoint after ``steps``, distilled from the zoo network ``teacher``),
    from its cached state_dict or trained now and cached."""
    if teacher is not None:
        build(teacher)  # an unknown teacher fails before any training
    path = checkpoint_path(cache, name, seed, steps, teacher)
    model = build(name)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return model.eval()
    if steps is None and teacher is None:
        model = train(name, seed)
    else:
        model = trajectory(name, seed, [steps if steps is not None else _full_steps()], teacher, cache)[0]
    with atomic_path(path, replace=True) as tmp:  # concurrent trainers never leave half a file
        torch.save(model.state_dict(), tmp)
    return model


def _full_steps() -> int:
    return EPOCHS * -(-len(digits_tensors()[0]) // TRAIN_BATCH)


def trajectory(name: str, seed: int, steps, teacher: str | nn.Module | None = None,
               cache: str | os.PathLike = "cache") -> list[nn.Module]:
    """Copies of the network after each of ``steps`` optimizer steps of one training (by distillation
    from ``teacher``, a network or the name of a zoo network, seed 0, when given), one thread as ``train``."""
    if not steps or min(int(s) for s in steps) < 1:
        raise SpecError(f"training steps {list(steps)} of zoo:{name}: give whole numbers of optimizer steps, at least 1")
    teacher_model = load(teacher, 0, cache) if isinstance(teacher, str) else teacher
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = {step: copy.deepcopy(model) for step, model in _steps(name, seed, steps, teacher_model)}
    finally:
        torch.set_num_threads(threads)
    return [found[int(step)] for step in steps]


def save_checkpoints(name: str, seed: int, steps, pattern: str, teacher: str | nn.Module | None = None,
                     cache: str | os.PathLike = "cache") -> list[Path]:
    """Write the state_dict after each of ``steps`` to ``pattern.format(step=step)``: a trajectory's
    checkpoint files, loadable as ``FILE?arch=zoo:NAME``."""
    paths = []
    for step, model in zip(steps, trajectory(name, seed, steps, teacher, cache)):
        path = Path(pattern.format(step=step))
        with atomic_path(path, replace=True) as tmp:
            torch.save(model.state_dict(), tmp)
        paths.append(path)
    return paths


def accuracy(model: nn.Module) -> float:
    """Training-set accuracy on digits (a sanity check that training worked)."""
    x, y = digits_tensors()
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())
