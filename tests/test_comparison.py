"""The comparison's plan and verdicts (benchmarks/comparison.py): schedules, targets per
schedule."""
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
    assert _opts(3.0) == {"SOLVER.MAX_ITER": "7200", "SOLVER.STEPS": "(5760, 6720)",
                          "TEST.EVAL_PERIOD": "1800", "SOLVER.CHECKPOINT_PERIOD": "900"}
    assert _opts(4.5) == {"SOLVER.MAX_ITER": "10800", "SOLVER.STEPS": "(8640, 10080)",
                          "TEST.EVAL_PERIOD": "2700", "SOLVER.CHECKPOINT_PERIOD": "900"}


def test_every_judged_schedule_has_the_issues_seeds_and_its_check_for_every_detector():
    planned = {(d, m, s, f) for d, models, seeds, f in PHASE1 + PHASE2
               for s in seeds for m in models}
    min_seeds = {"shapes": 3, "crowded": 2}
    for dataset in comparison.DATASETS:
        for schedule, check in comparison.SCHEDULES.items():
            for model in comparison.MAIN_MODELS:
                seeds = {s for d, m, s, f in planned
                         if (d, m, f) == (dataset, model, float(schedule[1:]))}
                assert len(seeds) >= min_seeds[dataset], (dataset, model, schedule)
                assert (dataset, model, 0, float(check[1:])) in planned and 0 in seeds


def test_phase1_runs_keep_the_config_hash_they_were_trained_with(tmp_path):
    # The cached phase-1 runs are found by this hash: a change of the run's config (a new config
    # key with a default included) orphans every one of them. If that is intended, the runs
    # must be trained again; update the pin only then.
    spec = comparison.run_spec("shapes", "dsla", 0, 1.0, str(tmp_path))
    assert spec["config_hash"] == "643d5d2e20405ab6"


def _record(model, seed, factor, ap, lost=0.03):
    return {"dataset": "shapes", "model": model, "seed": seed, "factor": factor,
            "bbox": {k: ap for k in comparison.METRICS}, "spearman_matched": 0.5,
            "nms": {"mean_iou_lost": lost, "fraction_worse_0.05": 0.1},
            "curve": [{"iter": i, "AP": ap} for i in (1, 2, 3, 4)]}


def _two_schedules(dsla_3x=(73.0, 73.0), dsla_lost_3x=0.01, gain_4p5x=None, skip=()):
    """At 1x DSLA trails plain FCOS and 1.5x adds 3 AP to everyone; at 3x (by default) DSLA leads
    plain FCOS (70 AP) by 3 AP in both seeds, has the smallest NMS loss, and 4.5x adds 0.5 AP.
    ``gain_4p5x``: {model: gain} overrides; ``skip``: (model, factor) runs left out."""
    base = {"fcos_plain": 60.0, "fcos": 61.0, "dsla": 59.0, "dsla_tricks": 62.0}
    lost = {"fcos_plain": 0.02, "fcos": 0.03, "dsla": 0.04, "dsla_tricks": 0.03}
    records = []
    for m, ap in base.items():
        records += [_record(m, s, 1.0, ap, lost[m]) for s in (0, 1)]
        records.append(_record(m, 0, 1.5, ap + 3.0))
        long_ap = [dsla_3x[s] if m == "dsla" else ap + 10.0 for s in (0, 1)]
        records += [_record(m, s, 3.0, long_ap[s], dsla_lost_3x if m == "dsla" else lost[m])
                    for s in (0, 1)]
        records.append(_record(m, 0, 4.5, long_ap[0] + (gain_4p5x or {}).get(m, 0.5)))
    return [r for r in records if (r["model"], r["factor"]) not in skip]


def _at_3x(**kwargs):
    return check_targets(summarize(_two_schedules(**kwargs)))["shapes"]["x3"]


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
    assert [d["AP"] for d in at3["paired"]["dsla-fcos_plain"]["per_seed"].values()] == [3.0, 3.0]


def test_claim_1_needs_the_mean_lead_and_every_seed_ahead():
    key = "dsla_ge_fcos_plain_plus_1_every_seed"
    assert _at_3x(dsla_3x=(71.0, 71.0))[key] is True  # +1.0 exactly: met
    assert _at_3x(dsla_3x=(70.9, 71.0))[key] is False  # mean +0.95
    assert _at_3x(dsla_3x=(76.0, 69.9))[key] is False  # mean +2.95, seed 1 behind
    assert _at_3x(dsla_3x=(76.0, 70.0))[key] is False  # seed 1 level is not ahead


def test_claim_2_needs_dsla_below_both_fcos_variants():
    key = "dsla_nms_iou_lost_below_both_fcos"
    assert _at_3x(dsla_lost_3x=0.025)[key] is False  # between plain FCOS (0.02) and FCOS (0.03)
    assert _at_3x(dsla_lost_3x=0.02)[key] is False  # level with plain FCOS is not smaller
    assert _at_3x(dsla_lost_3x=0.019)[key] is True


def test_convergence_needs_every_detectors_check_at_most_1_ap():
    key = "converged_1p5x_adds_at_most_1_ap"
    assert _at_3x(gain_4p5x={"fcos": 1.0})[key] is True  # 1.0 exactly: met
    assert _at_3x(gain_4p5x={"fcos": 1.1})[key] is False  # one detector over
    assert _at_3x(skip=[("dsla_tricks", 4.5)])[key] is None  # one check missing: not measured
    # ... unless a check that is in already adds more than 1 AP: missed whatever the rest add.
    assert _at_3x(gain_4p5x={"dsla": 1.8}, skip=[("dsla_tricks", 4.5)])[key] is False
    assert _at_3x(gain_4p5x={"dsla": 1.0}, skip=[("dsla_tricks", 4.5)])[key] is None


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
              "runs_finished": len(records), "runs_planned": 62, "cost_line": "cost",
              "runs": records, "protocol": {"plan": comparison.PLAN}}
    text = render_markdown(result)
    assert ("phase 1 (1× and 1.5×): 12 of 34 runs finished, "
            "phase 2 (3× and 4.5×): 12 of 28 runs finished") in text
    done = dict(result, phases={"phase 1": [34, 34], "phase 2": [1, 28]})
    assert "(phase 1: complete, phase 2: 1 of 28 runs finished)" in render_markdown(done)
    at1, at3 = text[:text.index("##### At 3×")], text[text.index("##### At 3×"):]
    assert "| FCOS, plain (the paper's baseline) | 0 | +0.5 |" in at3
    assert "AP(4.5×) − AP(3×)" in at3
    assert "| DSLA (R-50 1x head options) | 2 | 73.0 (73.0–73.0) |" in at3
    assert "| dsla − fcos_plain | seed 0: +3.0, seed 1: +3.0 | 3.0 (3.0–3.0) |" in at3
    assert ("- mean DSLA ≥ mean FCOS-plain + 1.0 AP, DSLA ahead in every seed: **met**" in at3
            and "**missed**" not in at3)
    assert "- 1.5× this schedule (4.5× vs 3×) adds ≤ 1 AP (every detector): **met**" in at3
    # The plan has seed 2 too: the verdicts so far are marked as such, at both schedules.
    assert "Targets at 3× (provisional: 12 of 16 runs finished):" in at3
    assert "Targets at 1× (provisional: 12 of 16 runs finished):" in at1
    two_seeds = tuple((d, m, tuple(x for x in seeds if x < 2), f)
                      for d, m, seeds, f in comparison.PLAN)
    final = render_markdown(dict(result, protocol={"plan": two_seeds}))
    assert "Targets at 3×:" in final and "provisional" not in final
    assert "fewer than" not in final  # every fake run has its 4 evaluations
    records[0]["curve"] = records[0]["curve"][:3]
    assert ("Runs whose curve has fewer than 4 evaluations: shapes/fcos_plain/seed0 x1 (3)."
            in render_markdown(result))
    assert "- 1.5× this schedule (1.5× vs 1×) adds ≤ 1 AP (every detector): **missed**" in at1
    # A check over 1 AP decides convergence for good, even while the verdicts are provisional.
    over = _two_schedules(gain_4p5x={"dsla": 1.8}, skip=[("dsla_tricks", 4.5)])
    summary = summarize(over)
    text = render_markdown(dict(result, summary=summary, targets=check_targets(summary),
                                runs=over))
    assert ("(4.5× vs 3×) adds ≤ 1 AP (every detector): **missed** (final: a check already adds "
            "more than 1 AP)") in text
    assert "**missed** (final" not in render_markdown(dict(result, protocol={"plan": two_seeds},
                                                           runs=records))
    assert "| DSLA (R-50 1x head options) | 2 | 59.0 (59.0–59.0) |" in at1 and "73.0" not in at1


def test_curves_are_drawn_for_every_schedule(tmp_path):
    records = _two_schedules()
    path = tmp_path / "curves.png"
    comparison.plot_curves(records + [dict(records[0], factor=0.01)], str(path))
    assert path.stat().st_size > 1000


def test_restore_recreates_only_unchanged_unrecorded_runs_and_reports_them(tmp_path):
    # A new machine has no run cache: the committed report must bring back the finished runs
    # (so they are not trained again), but never over a run recorded here nor for a changed config.
    runs = str(tmp_path / "runs")
    specs = [comparison.run_spec("shapes", m, 0, 1.0, runs) for m in ("dsla", "fcos_plain", "fcos")]
    recorded = dict(_record("fcos_plain", 0, 1.0, 50.0), config_hash=specs[1]["config_hash"],
                    status="analysed", signal={"num_pos": 3.0}, resumed_from_iter=0, opts=[],
                    train={"cpu_s": 1.0}, analysis_cost={"cpu_s": 1.0})
    comparison.write_record(specs[1], **dict(recorded, bbox={"AP": 1.0}))  # recorded here
    report = [dict(recorded, model=m, config_hash=s["config_hash"]) for m, s in
              (("dsla", specs[0]), ("fcos_plain", specs[1]), ("fcos", {"config_hash": "changed"}))]
    # Not finished in the report, or missing what a report needs: never restored.
    specs.append(comparison.run_spec("shapes", "dsla", 1, 1.0, runs))
    report += [dict(report[0], seed=1, config_hash=specs[3]["config_hash"]),
               dict(report[2], config_hash=specs[2]["config_hash"], status="trained")]
    del report[3]["train"]
    path = tmp_path / "comparison.json"
    path.write_text(comparison.json.dumps({"runs": report}))

    done = comparison.restore_records(specs, str(path))
    assert done == {"restored": ["shapes/dsla/seed0_x1"], "kept": ["shapes/fcos_plain/seed0_x1"],
                    "stale": ["shapes/fcos/seed0_x1", "shapes/dsla/seed1_x1",
                              "shapes/fcos/seed0_x1"]}
    assert [comparison.is_done(s) for s in specs] == [True, True, False, False]
    assert not any((tmp_path / "runs" / "shapes" / m).exists() for m in ("fcos", "dsla/seed1_x1"))
    assert comparison.read_record(specs[1])["bbox"] == {"AP": 1.0}  # not overwritten
    # Its signal comes from the record: the run's metrics.json is not on this machine.
    restored = comparison.report_record(specs[0])
    assert restored["signal"] == {"num_pos": 3.0} and restored["bbox"]["AP"] == 50.0
    # A report written from restored runs restores again.
    path.write_text(comparison.json.dumps({"runs": [restored]}))
    (tmp_path / "runs" / "shapes" / "dsla" / "seed0_x1" / "benchmark_run.json").unlink()
    assert comparison.restore_records(specs, str(path))["restored"] == ["shapes/dsla/seed0_x1"]


def test_cost_line_says_which_cpus_trained_the_runs():
    # bfloat16 autocast may round differently on another CPU: runs compared across machines
    # must say so. Runs from before the field existed are counted as not recorded.
    runs = [{"trained_on": ["AMD EPYC"]}, {"trained_on": ["AMD EPYC"]},
            {"trained_on": ["Intel Xeon", "AMD EPYC", "AMD EPYC"]}, {}]
    assert comparison.cpu_models_text(runs) == (
        " Trained on: AMD EPYC: 2 runs; Intel Xeon + AMD EPYC: 1 run; not recorded: 1 run.")
    assert comparison.cpu_models_text([{}, {"trained_on": []}]) == ""


def test_every_training_attempt_records_its_cpu(tmp_path, monkeypatch):
    spec = comparison.run_spec("shapes", "dsla", 0, 1.0, str(tmp_path / "runs"))
    comparison.write_record(spec, status="failed", trained_on=["Intel Xeon"])
    monkeypatch.setattr(comparison, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(comparison, "_run_logged", lambda *a: {"returncode": 1})
    assert comparison.train_and_analyse(spec, threads=1) is False
    assert comparison.read_record(spec)["trained_on"] == ["Intel Xeon", "AMD EPYC"]
