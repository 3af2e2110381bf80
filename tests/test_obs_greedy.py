"""The fast greedy of ``criterion="obs"`` (passes/obs_solve.py ``greedy_removal``), float64.

``greedy_removal`` keeps the inverse as ``H − L Rᵀ`` with pending factors, folds them in
every ``FLUSH_COLUMNS`` columns and drops removed rows and columns then; it keeps the
units' diagonal blocks downdated step by step. Oracle: the plain loop over the
oracle-tested primitives (``removal_errors`` on the full downdated inverse, then
``remove_columns``), for every flush width (1: fold after every step; large: never fold),
units of mixed sizes, columns that belong to no unit (bias, unprunable inputs), and
``per_step`` 1 and 3.
"""
import pytest
import torch

from fxprune.passes import obs_solve
from fxprune.passes.obs_solve import damped_inverse, greedy_removal, remove_columns, removal_errors

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _problem(seed=0, d=31, o=7, sizes=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=DT)
    X[:, 1] = X[:, 0] + 1e-3 * X[:, 1]          # nearly collinear columns
    W = torch.randn(o, d, generator=g, dtype=DT)
    # units of 1, 2 and 3 columns; columns 29 and 30 (a bias, an unprunable input) in none
    sizes = sizes or [1, 3, 2, 1, 1, 3, 2, 2, 1, 3, 1, 2, 1, 3, 1, 2]
    units, start = [], 0
    for s in sizes:
        units.append(torch.arange(start, start + s))
        start += s
    assert start == 29
    perm = torch.randperm(len(units), generator=g).tolist()   # column order != unit order
    return damped_inverse(X.T @ X, 1e-2), W, [units[i] for i in perm]


def _reference(Hinv, W, units, per_step):
    """Old greedy: full inverse and weight, every unit's block gathered each step."""
    remaining, order, increases = list(range(len(units))), [], []
    while remaining:
        errs = removal_errors(Hinv, W, [units[u] for u in remaining])
        take = torch.argsort(errs, stable=True)[:per_step].tolist()
        order += [remaining[k] for k in take]
        increases += [float(errs[k]) for k in take]
        chosen = [remaining[k] for k in take]
        remaining = [u for u in remaining if u not in chosen]
        if remaining:
            W, Hinv = remove_columns(W, Hinv, torch.cat([units[u] for u in chosen]))
    return order, increases


@pytest.mark.parametrize("flush", [1, 4, 10, 10_000])
@pytest.mark.parametrize("per_step", [1, 3])
def test_fast_greedy_equals_the_plain_loop(monkeypatch, flush, per_step):
    Hinv, W, units = _problem(seed=flush + per_step)
    monkeypatch.setattr(obs_solve, "FLUSH_COLUMNS", flush)
    order, increases = greedy_removal(Hinv, W, units, per_step)
    ref_order, ref_inc = _reference(Hinv, W, units, per_step)
    assert order == ref_order
    assert increases == pytest.approx(ref_inc, rel=1e-8, abs=1e-12)
    assert sorted(order) == list(range(len(units)))


@pytest.mark.parametrize("flush", [1, 4, 10_000])
@pytest.mark.parametrize("per_step", [1, 3])
def test_all_scalar_units_equal_the_plain_loop(monkeypatch, flush, per_step):
    """Layers whose units are single columns (1x1 convs, Linear) take the vector path:
    ``diag H⁻¹`` and ``diag W̃ᵀW̃`` over every column, units masked instead of dropped."""
    Hinv, W, units = _problem(seed=7 + flush, sizes=[1] * 29)
    monkeypatch.setattr(obs_solve, "FLUSH_COLUMNS", flush)
    order, increases = greedy_removal(Hinv, W, units, per_step)
    ref_order, ref_inc = _reference(Hinv, W, units, per_step)
    assert order == ref_order
    assert increases == pytest.approx(ref_inc, rel=1e-8, abs=1e-12)


def test_inputs_are_not_mutated_and_ties_go_to_the_lower_index(monkeypatch):
    Hinv, W, units = _problem(seed=3)
    monkeypatch.setattr(obs_solve, "FLUSH_COLUMNS", 2)
    H0, W0 = Hinv.clone(), W.clone()
    greedy_removal(Hinv, W, units)
    assert torch.equal(Hinv, H0) and torch.equal(W, W0)
    # two identical, independent units: same error, the lower index goes first
    eye = torch.eye(4, dtype=DT)
    w = torch.tensor([[1.0, 1.0, 3.0, 2.0]], dtype=DT)
    order, inc = greedy_removal(eye, w, [torch.tensor([3]), torch.tensor([0]),
                                         torch.tensor([1])])
    assert order == [1, 2, 0] and inc == pytest.approx([1.0, 1.0, 4.0])


def test_damped_inverse_is_the_inverse():
    Hinv, _, _ = _problem(seed=5)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(50, 12, generator=g, dtype=DT)
    H = X.T @ X
    lam = 1e-2 * float(torch.diagonal(H).mean())
    torch.testing.assert_close(damped_inverse(H, 1e-2) @ (H + lam * torch.eye(12, dtype=DT)),
                               torch.eye(12, dtype=DT), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rows", [1, 3, 256])
def test_compaction_in_place_equals_the_submatrix(monkeypatch, rows):
    """A fold's compaction writes ``T[idx][:, idx]`` into ``T``'s own storage."""
    monkeypatch.setattr(obs_solve, "COMPACT_ROWS", rows)
    g = torch.Generator().manual_seed(rows)
    for keep in ([0, 1, 2, 3, 4, 5, 6], [1, 2, 5], [0, 3, 4, 6], [6], []):
        T = torch.randn(7, 7, generator=g, dtype=DT)
        idx = torch.tensor(keep, dtype=torch.long)
        want = T[idx][:, idx].clone()
        got = obs_solve._compact_in_place(T, idx)
        assert torch.equal(got, want)
        assert not keep or got.data_ptr() == T.data_ptr()


def test_inverse_in_place_equals_the_copying_inverse():
    Hinv, _, _ = _problem(seed=9)
    A = torch.linalg.inv(Hinv)                      # a positive definite matrix
    want = obs_solve.inverse_if_positive_definite(A)
    B = A.clone()
    got = obs_solve.inverse_if_positive_definite(B, overwrite=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.data_ptr() == B.data_ptr()
    assert obs_solve.inverse_if_positive_definite(-A.clone(), overwrite=True) is None
