"""The models and datasets that the tests name by spec: ``tests.spec_factories:NAME[?key=value]``.

Model specs and dataset specs of the ``package.module:callable`` kind resolve to
the factories below, in the test process and in subprocesses and SLURM jobs alike.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's BasicBlock in miniature: one ReLU(inplace=True) called twice, ``out += identity``."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class BlockNet(nn.Module):
    """Digits (1, 8, 8) -> stem conv -> BasicBlock -> linear head."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block = BasicBlock(channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class LoggedDataset(torch.utils.data.TensorDataset):
    """A TensorDataset that records, in ``loaded``, every index it is asked for (to count loads)."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.loaded: list[int] = []

    def __getitem__(self, i):
        self.loaded.append(i)
        return super().__getitem__(i)


class Slow(nn.Module):
    """An MLP on digits that sleeps in its forward, so a test can kill it mid-run."""

    def __init__(self, delay: float = 0.05):
        super().__init__()
        self.delay = delay
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        time.sleep(self.delay)
        return self.body(x)


class Poisoned(nn.Module):
    """An MLP whose layer ``fc`` writes NaN (or a huge value) for the digits with most ink."""

    def __init__(self, value: float = float("nan")):
        super().__init__()
        self.fc = Poison(value)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.fc(x))


class Poison(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.linear = nn.Linear(64, 8)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        hit = (x.flatten(1).sum(1) > 25).unsqueeze(1)  # 14 of the 1797 digits
        return torch.where(hit, torch.full_like(out, self.value), out)


class Flaky(nn.Module):
    """An MLP on digits whose layer ``fault`` outputs NaN while the file ``flag`` exists: a fault that
    goes away (a rerun after it is fixed extracts the same run: the file's path is not a weight)."""

    def __init__(self, flag: str):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fault = NanWhile(flag)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.fault(self.body(x)))


class NanWhile(nn.Module):
    def __init__(self, flag: str):
        super().__init__()
        self.flag = flag

    def forward(self, x):
        return torch.full_like(x, float("nan")) if os.path.exists(self.flag) else x


class Structured(nn.Module):
    """Outputs of every shape the hooks must handle: tuples, dicts, tokens, None."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 6)
        self.pair = Pair()
        self.named = Named()
        self.nothing = Nothing()

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))  # (B, 8 tokens, 6)
        a, b = self.pair(tokens)
        self.nothing(a)
        return self.named(b)["hidden"]


class Pair(nn.Module):
    def forward(self, t):
        return t * 2, t + 1


class Named(nn.Module):
    def forward(self, t):
        return {"logits": t.sum(-1), "hidden": t}


class Nothing(nn.Module):
    def forward(self, t):
        return None


def block_net():
    return BlockNet()


def slow(delay: float = 0.05):
    return Slow(delay)


def poisoned(value: float = float("nan")):
    return Poisoned(value)


def flaky(flag: str):
    torch.manual_seed(0)
    return Flaky(flag)


def structured():
    return Structured()


def not_a_module():
    return 42


class Tokens(nn.Module):
    """A Hugging Face-like model: keyword inputs ``input_ids`` and ``attention_mask``, (B, T, D) states."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 3)
        self.encoder = nn.Identity()

    def forward(self, input_ids, attention_mask=None):
        return self.encoder(self.embed(input_ids))


def tokens():
    return Tokens()


def token_rows(n: int = 8):
    """Variable-length token rows with labels, as a tokenized HF dataset gives them."""
    return [{"input_ids": list(range(1, 2 + i % 4)), "attention_mask": [1] * (1 + i % 4), "label": i % 2} for i in range(n)]


# --------------------------------------------------------------------------- datasets


def pairs(n: int):
    """(input, label) pairs: item i is the input (i, i)."""
    return [(torch.full((2,), float(i)), i % 3) for i in range(n)]


def two_token_rows():
    """Two token rows of unequal length with labels (padded per batch)."""
    return [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "label": 0},
        {"input_ids": [8], "attention_mask": [1], "label": 1},
    ]


def ramp_array(n: int = 12, d: int = 3):
    """A NumPy array of inputs: row i is i, i + 1/d, ..."""
    return np.arange(n * d, dtype=np.float32).reshape(n, d) / d


def ramp_tensor(n: int = 12, d: int = 3):
    """The same inputs as a torch tensor."""
    return torch.from_numpy(ramp_array(n, d))


def not_a_dataset():
    return 42


def flat():
    """Inputs flattened: what the model sees, stored as layer "0"."""
    return nn.Sequential(nn.Flatten())


def gray_tensor(image):
    """A transform callable: a PIL image -> its mean over colours, (1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).mean(axis=2)[None] / 255)
