"""Stage 1 of ckapipe: run a model once over a dataset and cache per-layer,
per-minibatch activations in chunked Zarr stores (see ``extract.store``).

This package imports torch lazily: ``extract.store`` and ``extract.errors`` are
used by the analysis stage, which runs without torch.
"""
