"""Stage 2 of ckapipe: minibatch CKA over cached runs with Dask (NumPy or CuPy).

Runs without torch.
"""
