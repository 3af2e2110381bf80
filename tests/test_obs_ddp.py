"""obs' calibration statistics under data parallelism: two gloo ranks, one batch each,
sum to the single-process statistics of both batches — the exact Gram's panels and the
factored Gram's channel / kernel sums, row counts and output energy alike (design §8)."""
import pytest
import torch

import obs_ddp_worker


def test_data_parallel_ranks_sum_to_the_single_process_statistics(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 2, 6, 6, generator=gen, dtype=torch.float64), None)
               for _ in range(2)]
    out = str(tmp_path / "stats")
    mp.spawn(obs_ddp_worker.run, args=(str(tmp_path / "store"), out, batches),
             nprocs=2, join=True)
    want = obs_ddp_worker.statistics(obs_ddp_worker.model(), batches)
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    assert set(r0) == set(want)
    for name in want:
        assert torch.equal(r0[name], r1[name])
        torch.testing.assert_close(r0[name].double(), want[name].double(), rtol=1e-12,
                                   atol=1e-12)
