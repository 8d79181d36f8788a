"""Small models for the extraction tests, importable as ``tests.extract_fixtures:NAME``
(model specs of the ``package.module:factory`` kind, also from a subprocess)."""

from __future__ import annotations

import time

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
