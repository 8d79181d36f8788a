"""Stage 1 of ckapipe: run a model once over a dataset and cache per-layer,
per-minibatch activations in chunked Zarr stores (see ``extract.store``).

This package imports torch lazily: ``extract.store`` and ``extract.errors`` are
used by the analysis stage, which runs without torch.
"""

__all__ = ["extract_run", "list_layers"]


def __getattr__(name: str):
    """``extract.extract_run`` and ``extract.list_layers`` import torch on first use only."""
    if name in __all__:
        from extract import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'extract' has no attribute {name!r}")
