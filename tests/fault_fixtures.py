"""Factories for the fault-matrix tests, importable as ``tests.fault_fixtures:NAME`` (also from a subprocess)."""

from __future__ import annotations

from torch import nn


class Flagged(nn.Module):
    """An MLP on digits that remembers the flag it was built with; ``flag`` flips the sign of its output."""

    def __init__(self, flag: bool):
        super().__init__()
        self.flag = flag
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))

    def forward(self, x):
        out = self.body(x)
        return out if self.flag else -out


def flagged(flag: bool = True):
    return Flagged(flag)
