"""benchmarks/quality/config.py: a method name pins every option its rows were measured
with, so that a later change of compile's defaults leaves the committed rows' meaning."""
from benchmarks.quality.config import method_options
from fxprune import Gradual


def test_gradual_obs_rows_keep_the_target_they_were_measured_with():
    assert method_options("obs@50", 0) == ("obs", {"normalize": "mean", "cost_aware": False,
                                                   "fill": False, "steps": Gradual(50, repair=None),
                                                   "target": "masked"})
    assert method_options("obs+dense@50", 0)[1]["target"] == "dense"
    assert "target" not in method_options("obs", 0)[1]          # one-shot: no reference
    assert "target" not in method_options("oba@50", 0)[1]       # obs' option only


def test_suffixes_combine_and_unknown_ones_are_perturbations():
    criterion, opts = method_options("obs+fisher+raw+kron", 3)
    assert criterion == "obs" and opts == {"normalize": None, "cost_aware": False,
                                           "fill": False, "scale": "fisher", "gram": "kron"}
    assert method_options("oba+consumer", 0)[1]["perturb"] == "consumer"
    assert method_options("random", 5)[1]["seed"] == 5


def test_bntrain_suffix_scores_gradual_steps_with_batch_statistics():
    import pytest
    opts = method_options("obs+dense+bntrain@50", 0)[1]
    assert opts["steps"] == Gradual(50, bn_train=True, repair=None) and opts["target"] == "dense"
    assert "bn_train" not in opts                               # compile has no such keyword
    assert method_options("obs@50", 0)[1]["steps"] == Gradual(50, repair=None)  # unless named
    assert method_options("obd+rfull@10", 0)[1]["steps"] == Gradual(10, repair="full")
    assert method_options("obd+rbn+bntrain@10", 0)[1]["steps"] == Gradual(
        10, bn_train=True, repair="bn")
    with pytest.raises(ValueError, match="@N"):
        method_options("obs+bntrain", 0)                        # one-shot: nothing to apply


def test_ranking_and_step_suffixes_combine_in_gradual_methods():
    criterion, opts = method_options("obs+dense+raw+cost+rfull@50", 1)
    assert criterion == "obs" and opts == {"normalize": None, "cost_aware": True,
                                           "fill": False, "target": "dense",
                                           "steps": Gradual(50, repair="full")}


def test_fill_suffix_gives_back_the_slack_and_other_rows_pin_it_off():
    assert method_options("obs+dense+raw+cost+fill+rfull@50", 0)[1]["fill"] is True
    assert method_options("obs", 0)[1]["fill"] is False
