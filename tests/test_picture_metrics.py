"""Precision / recall of the demo picture's detections (dsla.analysis.precision_recall)."""
import pytest
import torch

from detectron2.structures import Boxes, Instances

from dsla.analysis import precision_recall


def _dets(boxes, scores, classes):
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.long)
    return inst


GT = (torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), torch.tensor([0, 1]))


def test_counts_by_hand():
    dets = _dets(
        [[0, 0, 10, 10],     # TP for box 0 (score 0.9)
         [0, 0, 10, 9],      # duplicate of box 0: box already claimed -> FP (IoU 0.9)
         [20, 20, 40, 40],   # right place, wrong class -> FP
         [20, 20, 40, 30],   # class 1, IoU 0.5 exactly -> TP
         [60, 60, 70, 70]],  # below the threshold: not counted
        [0.9, 0.8, 0.7, 0.6, 0.3], [0, 0, 0, 1, 1])
    pr = precision_recall([dets], [GT], score_threshold=0.5)
    assert pr["true_positives"] == 2 and pr["detections"] == 4 and pr["ground_truth"] == 2
    assert pr["precision"] == pytest.approx(0.5) and pr["recall"] == pytest.approx(1.0)


def test_higher_score_claims_first():
    # A (0.9) overlaps G1 0.9 and G2 0.67; B (0.6) overlaps G1 0.67 and G2 0.33. By decreasing
    # score A takes G1 and B misses: 1 hit. Taken the other way round both would hit.
    gt = (torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 6]]), torch.tensor([0, 0]))
    dets = _dets([[0, 2, 10, 12], [0, 0, 10, 9]], [0.6, 0.9], [0, 0])
    pr = precision_recall([dets], [gt], 0.5)
    assert pr["true_positives"] == 1 and pr["recall"] == pytest.approx(0.5)
    # Each detection claims the box it overlaps most: A takes G1, not G2.
    pr = precision_recall([_dets([[0, 0, 10, 9]], [0.9], [0])], [gt], 0.5, iou_threshold=0.8)
    assert pr["true_positives"] == 1


def test_threshold_and_empty_cases():
    dets = _dets([[0, 0, 10, 10]], [0.4], [0])
    assert precision_recall([dets], [GT], 0.41)["detections"] == 0
    assert precision_recall([dets], [GT], 0.4)["true_positives"] == 1  # >= threshold counts
    empty_gt = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    pr = precision_recall([dets], [empty_gt], 0.1)
    assert pr["precision"] == 0.0 and pr["recall"] == 1.0
    pr = precision_recall([_dets([], [], [])], [GT], 0.1)
    assert pr["precision"] == 1.0 and pr["recall"] == 0.0


def test_instances_from_coco_results_round_trip():
    """COCOEvaluator's saved entries (dataset category ids, XYWH) back to Instances per record."""
    from dsla.analysis import instances_from_coco_results

    records = [{"image_id": 7, "height": 50, "width": 60}, {"image_id": 3, "height": 40, "width": 40}]
    results = [{"image_id": 3, "category_id": 12, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5},
               {"image_id": 3, "category_id": 10, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9}]
    out = instances_from_coco_results(results, records, {10: 0, 12: 1})
    assert [len(i) for i in out] == [0, 2] and out[0].image_size == (50, 60)
    assert out[1].pred_boxes.tensor.tolist() == [[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 10.0, 10.0]]
    assert out[1].pred_classes.tolist() == [1, 0]
    assert out[1].scores.tolist() == [0.5, pytest.approx(0.9)]
