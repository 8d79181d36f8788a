"""Stage 1 of ckapipe, ``ckapipe.extract``: run a model once over a dataset and cache
per-layer, per-minibatch activations in chunked Zarr stores (see ``ckapipe.store``).

torch is imported on first use of ``extract_run`` or ``list_layers``, so that
``import ckapipe.extract`` stays cheap.
"""

if __name__ != "ckapipe.extract":  # this folder is installed as ckapipe.extract, never as a top-level module
    raise ImportError(f"the folder extract/ is the package ckapipe.extract: import ckapipe.extract, not {__name__}")

__all__ = ["extract_run", "list_layers"]


def __getattr__(name: str):
    if name in __all__:
        from ckapipe.extract import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'ckapipe.extract' has no attribute {name!r}")
