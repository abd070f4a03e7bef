"""The investigation of the comparison (benchmarks/investigate.py): level binning and statistics."""
import math

from investigate import fpn_level, run_statistics

RANGES = [[0, 16], [16, 32], [32, 64], [64, 128], [128, 1e8]]


def test_level_is_the_range_of_half_the_longer_side():
    # Half of the longer side: 8 -> P3, 16 (a range's upper bound) -> P3, 17 -> P4, 100 -> P6,
    # 150 -> P7.
    boxes = [[0, 0, 16, 4], [0, 0, 2, 32], [0, 0, 34, 34], [0, 0, 200, 10], [0, 0, 300, 300]]
    assert fpn_level(boxes, RANGES).tolist() == [0, 0, 1, 3, 4]


def test_statistics_compare_the_kept_candidate_with_chance():
    rows = {"level": [0, 0, 1], "count": [3, 1, 0],
            "kept_iou": [0.6, 0.9, math.nan], "best_iou": [0.9, 0.9, math.nan],
            "mean_iou": [0.7, 0.9, math.nan], "spearman": [-0.5, math.nan, math.nan],
            "final_iou": [0.8, 0.7, 0.0]}
    s = run_statistics(rows)
    # Boxes with candidates: lost 0.3 and 0; a random pick would lose 0.2 and 0.
    assert math.isclose(s["iou_lost"], 0.15) and math.isclose(s["chance_iou_lost"], 0.1)
    assert math.isclose(s["chance_loss_avoided"], 1 - 0.3 / 0.2)
    assert math.isclose(s["cluster_size"], 2.0) and math.isclose(s["cluster_spearman"], -0.5)
    assert s["by_cluster_size"]["3"] == {"boxes": 1, "iou_lost": 0.30000000000000004}
    p3, p4 = s["by_level"]["P3"], s["by_level"]["P4"]
    assert p3["recall_50"] == 1.0 and p3["recall_75"] == 0.5 and p4["recall_50"] == 0.0


def test_zone_statistics_split_positives_by_the_source_of_their_label():
    from investigate import zone_statistics

    rows = {"relaxed": [0, 0, 1, 1], "q": [0.8, 0.6, 0.2, 0.4], "iou": [0.9, 0.4, 0.3, 0.7],
            "score": [0.5, 0.1, 0.01, 0.2], "images": [2]}
    z = zone_statistics(rows)
    assert z["core"]["per_image"] == 1.0 and math.isclose(z["core"]["q"], 0.7)
    assert math.isclose(z["relaxation"]["iou"], 0.5) and math.isclose(z["relaxation"]["score"], 0.105)
    # Core: the IoU-0.4 point scores 0.1 (counted); relaxation: the IoU-0.3 point scores 0.01.
    assert z["core"]["poor_but_scored"] == 0.5 and z["relaxation"]["poor_but_scored"] == 0.0
