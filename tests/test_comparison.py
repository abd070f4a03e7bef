"""The comparison's plan and verdicts (benchmarks/comparison.py): schedules, targets per schedule."""
import pytest

import comparison
from comparison import (
    PHASE1, PHASE2, check_targets, phase_progress, render_markdown, schedule_opts, summarize,
)

CONFIG = comparison.os.path.join(comparison.SHAPES_DIR, "dsla_R_18_FPN_cpu.yaml")


def _opts(factor):
    opts = schedule_opts(CONFIG, factor)
    return dict(zip(opts[::2], opts[1::2]))


def test_long_schedules_checkpoint_often_and_phase1_runs_keep_their_config():
    # Phase 1's runs were trained (and cached by config hash) with a checkpoint at every
    # evaluation: 600 iterations at 1x, 900 at 1.5x. Changing that would orphan them.
    assert _opts(1.0) == {"SOLVER.MAX_ITER": "2400", "SOLVER.STEPS": "(1920, 2240)",
                          "TEST.EVAL_PERIOD": "600", "SOLVER.CHECKPOINT_PERIOD": "600"}
    assert _opts(1.5)["SOLVER.CHECKPOINT_PERIOD"] == _opts(1.5)["TEST.EVAL_PERIOD"] == "900"
    # Phase 2's long runs: four evaluations, a checkpoint at least every 900 iterations.
    assert _opts(4.5) == {"SOLVER.MAX_ITER": "10800", "SOLVER.STEPS": "(8640, 10080)",
                          "TEST.EVAL_PERIOD": "2700", "SOLVER.CHECKPOINT_PERIOD": "900"}


def test_every_judged_schedule_has_its_check_planned_for_every_detector():
    planned = {(d, m, f) for d, models, seeds, f in PHASE1 + PHASE2 for m in models}
    for dataset in comparison.DATASETS:
        for schedule, check in comparison.SCHEDULES.items():
            for model in comparison.MAIN_MODELS:
                assert (dataset, model, float(schedule[1:])) in planned
                assert (dataset, model, float(check[1:])) in planned


def _record(model, seed, factor, ap, lost=0.03):
    return {"dataset": "shapes", "model": model, "seed": seed, "factor": factor,
            "bbox": {k: ap for k in comparison.METRICS}, "spearman_matched": 0.5,
            "nms": {"mean_iou_lost": lost, "fraction_worse_0.05": 0.1}}


def _two_schedules():
    """At 1x DSLA trails plain FCOS and 1.5x adds 3 AP to everyone; at 3x DSLA leads by 2 AP in
    both seeds, has the smallest NMS loss, and 4.5x adds 0.5 AP."""
    base = {"fcos_plain": 60.0, "fcos": 61.0, "dsla": 59.0, "dsla_tricks": 62.0}
    lost = {"fcos_plain": 0.02, "fcos": 0.03, "dsla": 0.04, "dsla_tricks": 0.03}
    records = []
    for m, ap in base.items():
        records += [_record(m, s, 1.0, ap, lost[m]) for s in (0, 1)]
        records.append(_record(m, 0, 1.5, ap + 3.0))
        long_ap = ap + 10.0 + (3.0 if m == "dsla" else 0.0)
        records += [_record(m, s, 3.0, long_ap, 0.01 if m == "dsla" else lost[m])
                    for s in (0, 1)]
        records.append(_record(m, 0, 4.5, long_ap + 0.5))
    return records


def test_targets_are_judged_at_each_schedule_on_its_own_runs_and_check():
    summary = summarize(_two_schedules())
    targets = check_targets(summary)["shapes"]
    assert targets["x1"] == {"dsla_ge_fcos_plain_plus_1_every_seed": False,
                             "dsla_tricks_ge_fcos": True,
                             "dsla_nms_iou_lost_below_both_fcos": False,
                             "converged_1p5x_adds_at_most_1_ap": False}
    assert targets["x3"] == {"dsla_ge_fcos_plain_plus_1_every_seed": True,
                             "dsla_tricks_ge_fcos": True,
                             "dsla_nms_iou_lost_below_both_fcos": True,
                             "converged_1p5x_adds_at_most_1_ap": True}
    at3 = summary["shapes"]["at"]["x3"]
    assert at3["convergence"]["dsla"] == {0: pytest.approx(0.5)}
    assert [d["AP"] for d in at3["paired"]["dsla-fcos_plain"]["per_seed"].values()] == [2.0, 2.0]


def test_a_schedule_without_its_check_is_not_judged_converged():
    records = [r for r in _two_schedules() if r["factor"] != 4.5]
    targets = check_targets(summarize(records))["shapes"]
    assert targets["x3"]["converged_1p5x_adds_at_most_1_ap"] is None
    assert "x3" in targets and "x4.5" not in targets  # 4.5x is a check, not a judged schedule


def test_report_counts_each_phase_and_shows_the_3x_verdicts():
    records = _two_schedules()
    summary = summarize(records)
    phases = phase_progress(records)
    # The fake records cover phase 1's main 1x/1.5x runs on shapes and phase 2's seeds 0-1.
    assert phases["phase 1 (1× and 1.5×)"] == [12, 34]
    assert phases["phase 2 (3× and 4.5×)"] == [12, 28]
    result = {"summary": summary, "targets": check_targets(summary), "phases": phases,
              "runs_finished": len(records), "runs_planned": 62, "cost_line": "cost"}
    text = render_markdown(result)
    assert "phase 1 (1× and 1.5×): 12 of 34, phase 2 (3× and 4.5×): 12 of 28" in text
    at3 = text[text.index("##### At 3×"):]
    assert "| FCOS, plain (the paper's baseline) | 0 | +0.5 |" in at3
    assert "AP(4.5×) − AP(3×)" in at3 and "Targets at 3×:" in at3
    assert "| dsla − fcos_plain | seed 0: +2.0, seed 1: +2.0 | 2.0 (2.0–2.0) |" in at3
