"""criterion="auto", the default of compile: obs with calibration data, else l2."""
import torch
import torch.nn as nn

import fxprune
from fxprune.api_prune import AUTO_CRITERION


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3)).eval()


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(n)]


def test_auto_is_obs_with_data_and_repairs():
    res = fxprune.compile(_net(), data=_data(), flops=0.6, progress=False)
    assert res.plan.meta["criterion"] == AUTO_CRITERION["data"] == "obs"
    assert res.report.repair is not None  # repair="auto" is "full" with data


def test_auto_is_l2_without_data_or_unstructured():
    x = torch.randn(4, 6)
    res = fxprune.compile(_net(), example_inputs=x, flops=0.6)
    assert res.plan.meta["criterion"] == "l2"
    res = fxprune.compile(_net(), data=_data(2), sparsity=0.5, unstructured=True,
                          progress=False)
    assert res.plan.meta["criterion"] == "l2"


def test_explicit_criterion_is_kept():
    res = fxprune.compile(_net(), "l1", data=_data(2), flops=0.6, progress=False)
    assert res.plan.meta["criterion"] == "l1"


def test_saliency_defaults_to_the_same_choice():
    with_data = fxprune.saliency(_net(), data=_data(2), progress=False)
    assert with_data.criterion == AUTO_CRITERION["data"]
    free = fxprune.saliency(_net(), example_inputs=torch.randn(4, 6))
    assert free.criterion == AUTO_CRITERION["data-free"]
    explicit = fxprune.saliency(_net(), "obs", data=_data(2), progress=False)
    for gid, scores in with_data.groups.items():
        assert torch.equal(scores, explicit.groups[gid])
