"""A disk slower than the model: every queued chunk is still written before extract_run returns."""

from __future__ import annotations

import time

import numpy as np
import torch

from ckapipe import store
from ckapipe.extract.runner import extract_run
from ckapipe.extract.zoo import digits_tensors


def test_chunks_queued_when_the_forward_loop_ends_are_written(tmp_path, monkeypatch):
    """Writers that lag (a slow or busy disk) leave the queue full at close: none of it may be dropped."""
    from tests.spec_factories import BlockNet

    real = store.Run.write_chunk

    def slow(self, k, arrays):
        time.sleep(0.3)  # longer than the writer queue's put timeout (0.1 s)
        real(self, k, arrays)

    monkeypatch.setattr(store.Run, "write_chunk", slow)
    torch.manual_seed(0)
    net = BlockNet().eval()
    run = store.open_run(extract_run(net, "digits", ["block"], cache=tmp_path, batch_size=128, progress=False,
                                     writer_threads=1))
    assert run.missing_chunks() == [] and run.status == store.COMPLETE
    images, _ = digits_tensors()
    ids = run.sample_ids()
    with torch.no_grad():
        expected = net.block(net.stem(images[torch.as_tensor(ids)])).flatten(1).numpy()
    np.testing.assert_allclose(run.layer("block")[:], expected, rtol=1e-6, atol=1e-6)
