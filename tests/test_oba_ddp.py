"""OBA under data parallelism: two gloo ranks, one batch each, agree bit for bit with
each other and with single-process scoring of both batches (design §8)."""
import pytest
import torch

import oba_ddp_worker
from fxprune.criteria.oba import oba_scores
from oba_oracles import data, trace


def test_data_parallel_gloo_ranks_agree(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    batches = data((2, 2, 6, 6), 3, n=2, seed=11)
    out = str(tmp_path / "scores")
    mp.spawn(oba_ddp_worker.run, args=(str(tmp_path / "store"), out, batches),
             nprocs=2, join=True)
    want = oba_scores(trace(oba_ddp_worker.model()), batches)
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    for n in want:
        assert torch.equal(r0[n], r1[n])
        torch.testing.assert_close(r0[n], want[n], rtol=1e-12, atol=1e-15)
