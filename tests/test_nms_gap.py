"""What NMS keeps against the best-localised candidate (dsla.analysis.nms_localisation_gap)."""
import math

import torch

from dsla.analysis import nms_localisation_gap, summarize_nms_gap


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kept_is_highest_score_best_is_highest_iou():
    gt = _t([[0, 0, 10, 10]])
    # IoUs with the box: 1.0, 0.8 (x1 = 8), 0.5 (x1 = 5), and 0.25 (below the threshold).
    cands = _t([[0, 0, 10, 10], [0, 0, 8, 10], [0, 0, 5, 10], [0, 0, 2.5, 10]])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.99])
    kept, best = nms_localisation_gap(cands, scores, torch.zeros(4, dtype=torch.long), gt,
                                      torch.zeros(1, dtype=torch.long))
    # The 0.99 candidate does not count (IoU 0.25 < 0.5): NMS keeps the 0.9 one (IoU 0.8).
    assert kept.tolist() == [0.800000011920929] and best.tolist() == [1.0]


def test_other_classes_and_missing_candidates():
    gt = _t([[0, 0, 10, 10], [20, 20, 30, 30]])
    cands = _t([[0, 0, 10, 10], [0, 0, 8, 10]])
    scores = torch.tensor([0.5, 0.9])
    # The better-scored candidate is of another class: the kept one is the exact box.
    kept, best = nms_localisation_gap(cands, scores, torch.tensor([0, 1]), gt,
                                      torch.tensor([0, 0]))
    assert kept[0] == 1.0 and best[0] == 1.0
    assert math.isnan(kept[1]) and math.isnan(best[1])


def test_equal_scores_take_the_lower_index():
    gt = _t([[0, 0, 10, 10]])
    cands = _t([[0, 0, 8, 10], [0, 0, 10, 10]])
    kept, best = nms_localisation_gap(cands, torch.tensor([0.5, 0.5]),
                                      torch.zeros(2, dtype=torch.long), gt,
                                      torch.zeros(1, dtype=torch.long))
    assert torch.allclose(kept, torch.tensor([0.8])) and best.item() == 1.0


def test_no_candidates_or_no_boxes():
    kept, best = nms_localisation_gap(torch.zeros(0, 4), torch.zeros(0),
                                      torch.zeros(0, dtype=torch.long), _t([[0, 0, 1, 1]]),
                                      torch.zeros(1, dtype=torch.long))
    assert math.isnan(kept.item()) and math.isnan(best.item())
    kept, best = nms_localisation_gap(_t([[0, 0, 1, 1]]), torch.ones(1),
                                      torch.zeros(1, dtype=torch.long), torch.zeros(0, 4),
                                      torch.zeros(0, dtype=torch.long))
    assert kept.numel() == 0 and best.numel() == 0


def test_summary_counts_only_boxes_with_candidates():
    kept = torch.tensor([0.8, 1.0, float("nan"), 0.7])
    best = torch.tensor([1.0, 1.0, float("nan"), 0.74])
    s = summarize_nms_gap(kept, best)
    assert s["num_gt"] == 4 and s["num_gt_with_candidates"] == 3
    assert math.isclose(s["mean_iou_lost"], (0.2 + 0.0 + 0.04) / 3, rel_tol=1e-6)
    assert math.isclose(s["fraction_worse_0.05"], 1 / 3)
    assert math.isclose(s["mean_kept_iou"], (0.8 + 1.0 + 0.7) / 3, rel_tol=1e-6)
    empty = summarize_nms_gap(torch.full((2,), float("nan")), torch.full((2,), float("nan")))
    assert empty["mean_iou_lost"] is None and empty["num_gt_with_candidates"] == 0
