"""benchmarks/quality/winners.py: families, the per-family best and the moonshot verdict."""
from benchmarks.quality.winners import best_cells, family, winners_table


def _ft(criterion, seed, acc, repair="full"):
    return {"model": "m", "budget": 0.3, "criterion": criterion, "seed": seed,
            "kind": "oneshot", "repair": None if criterion.startswith("tp-") else repair,
            "acc_after": acc}


def test_families_follow_the_base_criterion_and_the_perturbation():
    assert family("obs") == family("obs+fisher+raw@50") == "removal-aware"
    assert family("oba+consumer") == family("sosp-h+consumer@50") == "removal-aware"
    assert family("oba") == family("sosp-i@50") == family("oba-exact") == "papers"
    assert family("l2") == family("obd") == family("tp-magnitude") == "other"


def test_a_lead_beyond_both_spreads_is_clear_and_one_inside_is_not():
    clear = [_ft("obs", 0, 92.0), _ft("obs", 1, 92.2), _ft("l2", 0, 91.0), _ft("l2", 1, 91.1)]
    tight = [_ft("obs", 0, 92.0), _ft("obs", 1, 92.4), _ft("l2", 0, 91.8), _ft("l2", 1, 92.2)]
    assert "**clear**" in winners_table({"fine-tuned": clear}).splitlines()[-1]
    assert "inside the spread" in winners_table({"fine-tuned": tight}).splitlines()[-1]
    behind = [_ft("obs", 0, 90.0), _ft("obs", 1, 90.1)] + clear[2:]
    assert "behind" in winners_table({"fine-tuned": behind}).splitlines()[-1]


def test_one_seed_methods_and_unrepaired_fxprune_rows_do_not_compete():
    from benchmarks.quality.winners import stage_accuracies
    rows = [_ft("obs", 0, 99.0), _ft("l2", 0, 91.0), _ft("l2", 1, 91.2),
            _ft("obd", 0, 95.0, repair=None), _ft("obd", 1, 95.0, repair=None)]
    best = best_cells(stage_accuracies(rows, "fine-tuned"), "m", 0.3)
    assert best["removal-aware"] is None and best["papers"] is None
    assert best["other"][0] == "l2" and best["other"][3] == 2


def test_post_training_takes_torch_prunings_best_mode_and_fxprunes_full_repair():
    from benchmarks.quality.winners import stage_accuracies
    rows = [{"model": "m", "budget": 0.3, "criterion": "tp-magnitude", "seed": s,
             "kind": "posttrain", "acc_none": 10.0, "acc_bn": 30.0 + s} for s in (0, 1)]
    rows += [{"model": "m", "budget": 0.3, "criterion": "l2", "seed": s, "kind": "posttrain",
              "acc_none": 10.0, "acc_bn": 50.0, "acc_full": 80.0 + s} for s in (0, 1)]
    accs = stage_accuracies(rows, "post-training")
    assert accs[("m", 0.3, "tp-magnitude")] == [30.0, 31.0]
    assert accs[("m", 0.3, "l2")] == [80.0, 81.0]


def test_the_matrix_counts_budget_seed_points_per_stage_and_mode():
    from benchmarks.quality.winners import matrix_table
    ft = [dict(_ft("obs", s, 90.0), budget=b) for b in (0.3, 0.14) for s in (0, 1)]
    ft += [dict(_ft("obs@50", 0, 90.0), budget=0.3)]
    table = matrix_table({"fine-tuned": ft}).splitlines()
    row = next(line for line in table if "| m | obs |" in line)
    assert "| 4/8 (0.3, 0.14) | 1/8 (one seed) |" in row
    tp_row = next(line for line in table if "| m | tp-magnitude |" in line)
    assert tp_row.endswith("| 0/8 | n/a |")
