"""The investigation of the comparison (benchmarks/investigate.py): level binning and statistics."""
import math

import pytest
import torch

from detectron2.structures import Boxes, Instances

from investigate import (
    _cluster_counterfactual, _resized_gt, fpn_level, run_statistics, zone_statistics,
)

RANGES = [[0, 16], [16, 32], [32, 64], [64, 128], [128, 1e8]]
NAN = math.nan


def test_level_is_the_range_of_half_the_longer_side():
    # Half of the longer side: 8 -> P3, 16 (a range's upper bound) -> P3, 17 -> P4, 100 -> P6,
    # 150 -> P7.
    boxes = [[0, 0, 16, 4], [0, 0, 2, 32], [0, 0, 34, 34], [0, 0, 200, 10], [0, 0, 300, 300]]
    assert fpn_level(boxes, RANGES).tolist() == [0, 0, 1, 3, 4]


def test_statistics_compare_the_kept_candidate_with_chance():
    rows = {"level": [0, 0, 1, 1], "count": [3, 1, 0, 2],
            "kept_iou": [0.6, 0.9, NAN, 0.7], "best_iou": [0.9, 0.9, NAN, 0.8],
            "mean_iou": [0.7, 0.9, NAN, 0.75], "spearman": [-0.5, NAN, NAN, NAN],
            "final_iou": [0.8, 0.7, 0.0, 0.6]}
    s = run_statistics(rows)
    # Boxes with candidates: lost 0.3, 0, 0.1; a random pick would lose 0.2, 0, 0.05. The share
    # avoided is a ratio of sums (1 - 0.4 / 0.25), not a mean of per-box ratios (-0.5, -1).
    assert math.isclose(s["iou_lost"], 0.4 / 3) and math.isclose(s["chance_iou_lost"], 0.25 / 3)
    assert math.isclose(s["chance_loss_avoided"], 1 - 0.4 / 0.25)
    assert math.isclose(s["cluster_size"], 2.0) and math.isclose(s["cluster_spearman"], -0.5)
    assert s["by_cluster_size"]["3"]["boxes"] == 1
    assert math.isclose(s["by_cluster_size"]["3"]["iou_lost"], 0.3)
    p3, p4 = s["by_level"]["P3"], s["by_level"]["P4"]
    assert p3["recall_50"] == 1.0 and p3["recall_75"] == 0.5 and p4["recall_50"] == 0.5
    assert math.isclose(p3["final_iou"], 0.75) and math.isclose(p4["final_iou"], 0.3)
    # Candidates per box count only boxes that have a cluster (the P4 box without one is out).
    assert p3["cluster_size"] == 2.0 and p4["cluster_size"] == 2.0


def test_zone_statistics_split_positives_by_the_source_of_their_label():
    rows = {"relaxed": [0, 0, 1, 1], "q": [0.8, 0.6, 0.2, 0.4], "iou": [0.9, 0.4, 0.3, 0.7],
            "score": [0.5, 0.1, 0.01, 0.2], "images": [2],
            "lost_all": [0.2, NAN, 0.1], "lost_without": [0.0, NAN, NAN],
            "share_relaxed": [0.5, NAN, 1.0], "kept_relaxed": [1.0, NAN, 1.0]}
    z = zone_statistics(rows)
    assert z["unrelaxed"]["per_image"] == 1.0 and math.isclose(z["unrelaxed"]["q"], 0.7)
    assert math.isclose(z["relaxation"]["iou"], 0.5)
    assert math.isclose(z["relaxation"]["score"], 0.105)
    # Unrelaxed: the IoU-0.4 point scores 0.1 (counted); relaxation: the IoU-0.3 one scores 0.01.
    assert z["unrelaxed"]["poor_but_scored"] == 0.5 and z["relaxation"]["poor_but_scored"] == 0.0
    # Only the first box has a cluster both ways.
    assert z["clusters"] == {"boxes": 1, "lost_all": 0.2, "lost_without_relaxation": 0.0,
                             "share_relaxed": 0.5, "kept_relaxed": 1.0}


def test_counterfactual_drops_the_relaxation_only_points():
    gt = Instances((100, 100), gt_boxes=Boxes(torch.tensor([[0., 0., 10., 10.]])),
                   gt_classes=torch.tensor([1]))
    # Point 0: exact box, score 0.3 (unrelaxed); point 1: IoU 0.6, score 0.9, relaxation-only;
    # point 2: IoU 0.8 but class 1 scores below the threshold; point 3: IoU 0.25.
    boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 6., 10.], [0., 0., 8., 10.],
                          [0., 0., 2.5, 10.]])
    scores = torch.tensor([[0.0, 0.3], [0.0, 0.9], [0.9, 0.01], [0.0, 0.99]])
    out = _cluster_counterfactual(gt, boxes, scores, torch.tensor([False, True, False, False]),
                                  score_thresh=0.05)
    assert torch.allclose(out["lost_all"], torch.tensor([0.4]))
    assert torch.allclose(out["lost_without"], torch.tensor([0.0]))
    assert out["share_relaxed"].tolist() == [0.5] and out["kept_relaxed"].tolist() == [1.0]


def test_ground_truth_is_scaled_to_the_resized_image_per_axis():
    record = {"height": 100, "width": 200, "annotations": [
        {"bbox": [20, 10, 40, 30], "bbox_mode": 0, "category_id": 2}]}
    gt = _resized_gt(record, (50, 400))  # height halved, width doubled
    assert gt.gt_boxes.tensor.tolist() == [[40.0, 5.0, 80.0, 15.0]]
    assert gt.gt_classes.tolist() == [2]


def test_every_planned_run_has_its_datasets_class_count(tmp_path):
    import comparison
    from dsla.data.datasets import num_classes_of

    for spec in comparison.planned_specs(str(tmp_path)):
        opts = dict(zip(spec["opts"][::2], spec["opts"][1::2]))
        train = comparison.DATASETS[spec["dataset"]][0]
        assert opts["MODEL.DSLA.NUM_CLASSES"] == opts["MODEL.FCOS.NUM_CLASSES"] == str(
            num_classes_of(train)), spec["run_dir"]


def test_signal_curves_keep_the_last_log_of_a_resumed_iteration(tmp_path):
    import json

    from investigate import signal_curves

    rows = [{"iteration": i, "dsla/num_pos_per_image": 1.0} for i in (19, 39, 59)]
    # Resumed after iteration 39: 39 is logged again with another value; an eval row has no
    # scalar of interest.
    rows += [{"iteration": 39, "dsla/num_pos_per_image": 3.0}, {"iteration": 59, "bbox/AP": 5.0},
             {"iteration": 79, "dsla/num_pos_per_image": 1.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    curve = signal_curves(str(tmp_path), window=2)["num_pos_per_image"]
    assert curve["iter"] == [40, 60, 80] and curve["value"] == [2.0, 2.0, 1.0]


def test_docs_link_result_plots_with_dots_and_digits_in_their_names(tmp_path):
    from update_docs import section_text

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir(), docs.mkdir()
    (results / "investigation_shapes_x1.5.md").write_text("![a](investigation_shapes_x1.5_signal.png)")
    text = section_text("investigation_shapes_x1.5", str(results), str(docs / "B.md"))
    assert text == "![a](../results/investigation_shapes_x1.5_signal.png)"


def test_cost_line_names_the_resumed_runs(tmp_path):
    from comparison import cost_line, last_attempt_start

    (tmp_path / "log.txt").write_text("x Starting training from iteration 0\n"
                                      "y Starting training from iteration 1800\n")
    assert last_attempt_start(str(tmp_path)) == 1800
    assert last_attempt_start(str(tmp_path / "missing")) == 0
    run = {"dataset": "shapes", "model": "fcos", "seed": 2, "factor": 1.0,
           "train": {"cpu_s": 3000.0}, "analysis_cost": {"cpu_s": 600.0}}
    line = cost_line([dict(run, resumed_from_iter=0), dict(run, resumed_from_iter=1800)], 5, 0.0)
    assert line.startswith("2 of 5 planned runs finished; CPU time of the finished runs 2.0 h")
    assert "1 resumed run counts only their last attempt's CPU time (shapes/fcos/seed2 x1 from " \
           "iteration 1800), so the total is a lower bound." in line


def _record(model, seed, ap, lost):
    return {"dataset": "shapes", "model": model, "seed": seed, "factor": 1.0,
            "bbox": {k: ap for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
            "spearman_matched": 0.5, "nms": {"mean_iou_lost": lost, "fraction_worse_0.05": 0.1}}


def test_ladder_is_compared_on_the_seeds_its_rungs_share():
    from comparison import group_runs, ladder_summary, ladder_text

    records = [_record("dsla", s, 70.0 + s, 0.030) for s in (0, 1, 2)]
    records += [_record("fcos_plain", s, 60.0, 0.020) for s in (0, 1, 2)]
    records += [_record("ladder0_hard_labels", s, 66.0, 0.010) for s in (0, 1)]
    records += [_record("ladder2_relaxation", s, 68.0 + s, 0.025) for s in (0, 1)]
    ladder = ladder_summary(group_runs(records)["shapes"])
    assert ladder["seeds"] == [0, 1]  # DSLA's seed 2 is left out: like with like
    assert ladder["models"]["dsla"]["x1"]["AP"]["mean"] == 70.5
    assert ladder["models"]["fcos_plain"]["x1"]["seeds"] == [0, 1]
    steps = ladder["steps"]  # rung 1 missing: rung 2 is compared with rung 0
    assert list(steps) == ["ladder2_relaxation-ladder0_hard_labels", "dsla-ladder2_relaxation"]
    assert [d["AP"] for d in steps["dsla-ladder2_relaxation"]["per_seed"].values()] == [2.0, 2.0]
    assert steps["ladder2_relaxation-ladder0_hard_labels"]["per_seed"][1][
        "nms_mean_iou_lost"] == pytest.approx(0.015)
    text = ladder_text(ladder)
    assert "| rung 2 − rung 0 | 0, 1 | +2.0, +3.0 | +0.0150, +0.0150 |" in text
    assert ladder_summary(group_runs(records[:6])["shapes"]) is None  # no rung run yet


def test_runs_restored_from_a_report_are_skipped_not_reloaded(tmp_path, capsys):
    # A restored run (comparison.py --restore) has a record but no checkpoint or metrics.json.
    import comparison
    import investigate

    spec = comparison.run_spec("shapes", "dsla", 0, 1.0, str(tmp_path / "runs"))
    comparison.write_record(spec, status="analysed", restored_from="comparison.json")
    with pytest.raises(SystemExit, match="with their checkpoints"):
        investigate.main(["--output-dir", str(tmp_path), "--dataset", "shapes"])
    captured = capsys.readouterr()
    assert "skipped 1 runs restored from a report" in captured.out + captured.err
