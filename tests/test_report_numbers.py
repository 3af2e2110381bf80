"""Issue 16, misleading numbers: latency is timed dense/slim interleaved over rounds with
its spread reported; the API report's FLOPs are per example, whatever the batch."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.report import Report, measure_latency


class FakeClock:
    """A clock that only the timed modules advance (deterministic timings)."""

    def __init__(self):
        self.now, self.calls, self.order = 0.0, 0, []

    def __call__(self) -> float:
        return self.now


class Timed(nn.Module):
    """Takes ``ms`` on ``clock``, 100x longer during the calls numbered in ``spike``."""

    def __init__(self, name, ms, clock, spike=range(0)):
        super().__init__()
        self.name, self.ms, self.clock, self.spike = name, ms, clock, spike

    def forward(self, x):
        self.clock.order.append(self.name)
        slow = 100 if self.clock.calls in self.spike else 1
        self.clock.calls += 1
        self.clock.now += self.ms * slow / 1e3
        return x


def test_latency_interleaves_dense_and_slim_so_a_spike_hits_both():
    clock = FakeClock()
    spike = range(4, 9)  # a load spike during the first 5 timed calls (after warm-up)
    dense, slim = Timed("d", 2.0, clock, spike), Timed("s", 1.0, clock, spike)
    timed = measure_latency(dense, slim, (torch.zeros(1),), rounds=7, repeats=5, warmup=2,
                            clock=clock)
    # back to back (all dense passes, then all slim ones) the spike would land on dense
    # only and read as a 100x speedup; interleaved, the median round is unaffected
    assert abs(timed["before_ms"] / timed["after_ms"] - 2.0) < 1e-9
    timed_order = clock.order[4:]
    assert timed_order[:10] == ["d"] * 5 + ["s"] * 5
    assert timed_order[10:20] == ["s"] * 5 + ["d"] * 5  # the order alternates
    low, high = timed["speedup_range"]
    assert abs(low - 2.0) < 1e-9 and abs(high - 200.0) < 1e-6  # the spiked round shows
    report = Report(10, 5, 10, 5, latency_before_ms=timed["before_ms"],
                    latency_after_ms=timed["after_ms"], latency_speedup_range=[low, high])
    assert "latency: unreliable" in report.table()


def test_report_says_when_the_latency_spread_is_unreliable():
    report = Report(10, 5, 10, 5, latency_before_ms=2.0, latency_after_ms=1.0,
                    latency_speedup_range=[1.9, 2.1])
    assert "unreliable" not in report.table() and "(rounds 1.90-2.10x)" in report.table()
    report.latency_speedup_range = [1.05, 10.6]
    assert "latency: unreliable" in report.table()
    assert report.to_dict()["latency_speedup_range"] == [1.05, 10.6]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.Flatten(), nn.LazyLinear(4)).eval()


def test_report_flops_are_per_example_whatever_the_batch():
    model = _net()
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    one = fxprune.compile(model, "l2", torch.randn(1, 3, 8, 8), sparsity=0.5).report
    eight = fxprune.compile(model, "l2", torch.randn(8, 3, 8, 8), sparsity=0.5,
                            measure_latency=True).report
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, 8, 8))
    assert eight.flops_before == one.flops_before == counter.get_total_flops()
    assert eight.flops_after == one.flops_after
    assert not any("whole batch" in note for note in eight.notes)
    assert eight.latency_speedup_range is not None
