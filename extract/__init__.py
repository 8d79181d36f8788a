"""Stage 1 of ckapipe, ``ckapipe.extract``: run a model once over a dataset and cache
per-layer, per-minibatch activations in chunked Zarr stores (see ``ckapipe.store``).

torch is imported on first use of ``extract_run`` or ``list_layers`` (``__getattr__`` below: the
lazy boundary of docs/design.md), so that ``import ckapipe.extract`` stays cheap and torch-free.
"""

if __name__ != "ckapipe.extract":  # this folder is installed as ckapipe.extract, never as a top-level module
    raise ImportError(f"the folder extract/ is the package ckapipe.extract: import ckapipe.extract, not {__name__}")

__all__ = ["extract_run", "list_layers"]


def __getattr__(name: str):
    """``extract_run`` and ``list_layers`` from their module, which imports torch, on first use."""
    if name in __all__:
        from ckapipe.extract import runner  # optional: torch

        return getattr(runner, name)
    raise AttributeError(f"module 'ckapipe.extract' has no attribute {name!r}")
