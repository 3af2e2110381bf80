"""``fxprune prune --option KEY=VALUE``: a criterion's options (obs' ``gram``/``damp``,
OBA's ``perturb``, ...) from the command line, as compile's keywords. Values parse as
bools, numbers or text; undeclared, repeated and ``seed`` keys are refused before the
model is built; ``fxprune criteria`` lists each criterion's options."""
from __future__ import annotations

import argparse

import pytest

import fxprune
from fxprune.cli.common import criterion_option

PRUNE = ["prune", "tiny_vgg", "--sparsity", "0.5", "--batches", "1", "--batch-size", "2",
         "--no-measure-latency", "--no-verify", "-q"]


@pytest.mark.parametrize("text, expected", [
    ("gram=kron", ("gram", "kron")), ("damp=0.05", ("damp", 0.05)), ("damp=1e-2", ("damp", 0.01)),
    ("batch_chunk=2", ("batch_chunk", 2)), ("batch-chunk=2", ("batch_chunk", 2)),
    ("first_order=true", ("first_order", True)), ("first_order=False", ("first_order", False)),
    (" perturb = consumer ", ("perturb", "consumer")),
])
def test_option_values_parse_as_bools_numbers_or_text(text, expected):
    key, value = criterion_option(text)
    assert (key, value) == expected and type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["gram", "=kron", "gram=", "2x=1", "damp=nan", "damp=inf"])
def test_malformed_options_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        criterion_option(text)


def _main(capsys, *extra, base=PRUNE):
    """Exit code and stderr of ``fxprune <base> <extra>`` (argparse exits included)."""
    from fxprune.cli import main
    try:
        code = main([*base, *extra])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def test_options_reach_compile_and_the_criterion(capsys, monkeypatch):
    seen = {}
    real_compile = fxprune.compile

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(fxprune, "compile", spy)
    code, err = _main(capsys, "--criterion", "obs", "--repair", "full",
                      "--option", "gram=exact", "--option", "damp=0.05")
    assert code == 0, err
    assert seen["gram"] == "exact" and seen["damp"] == 0.05
    # a value the criterion refuses is its own one-line error: the option arrived there
    code, err = _main(capsys, "--criterion", "obs", "--repair", "full", "--option", "gram=foo")
    assert code == 2 and "gram='foo'" in err, err


@pytest.mark.parametrize("extra, needles", [
    (["--criterion", "obs", "--option", "dmp=0.1"], ["no option 'dmp'", "'damp'", "gram"]),
    (["--criterion", "l2", "--option", "damp=0.1"], ["'l2' has no option", "its options: none"]),
    (["--criterion", "obs", "--option", "damp=0.1", "--option", "damp=0.2"], ["given twice"]),
    (["--criterion", "random", "--option", "seed=3"], ["--seed"]),
])
def test_bad_option_keys_are_refused_before_the_model_is_built(capsys, monkeypatch, extra,
                                                                needles):
    from fxprune.cli import prune

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(prune, "load_model", no_model)
    code, err = _main(capsys, *extra)
    assert code == 2, err
    for needle in needles:
        assert needle in err, err


def test_seed_still_reaches_random(capsys, monkeypatch):
    seen = {}
    real_compile = fxprune.compile
    monkeypatch.setattr(fxprune, "compile",
                        lambda *a, **k: seen.update(k) or real_compile(*a, **k))
    code, err = _main(capsys, "--criterion", "random", "--seed", "7")
    assert code == 0 and seen["seed"] == 7, err


def test_criteria_lists_each_criterions_options(capsys):
    from fxprune.cli import main
    from fxprune.criteria import get_criterion
    assert main(["criteria"]) == 0
    lines = capsys.readouterr().out.splitlines()
    obs_line = lines.index(next(ln for ln in lines if ln.startswith("obs ")))
    assert lines[obs_line + 1].split("options (--option KEY=VALUE): ")[1] == \
        ", ".join(get_criterion("obs").options)
    random_line = lines.index(next(ln for ln in lines if ln.startswith("random ")))
    assert "--option" not in lines[random_line + 1]  # its one option is --seed
