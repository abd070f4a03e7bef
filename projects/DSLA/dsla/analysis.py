"""Score-localisation consistency: match detections to ground truth, correlate score with IoU.

DSLA's claim (docs/METHOD.md, "IoU coupling") is that coupling the classification target with
the IoU makes the score rank boxes by localisation quality, so that NMS keeps the best-localised
box. This module measures that on a dataset, with pure functions that
``dsla.tools.analyze_consistency`` and the benchmarks share, and one detectron2
``DatasetEvaluator`` that collects the pairs during ``inference_on_dataset``.

Matching rule (``match_detections``): every detection is compared with the ground-truth boxes of
its own class (crowd boxes excluded) and takes the highest IoU among them; a detection with no
same-class box, or overlapping none, gets IoU 0. All detections are kept: a confident detection
with IoU 0 is exactly the inconsistency being measured. ``correlations_by_rule`` also reports
the subset with IoU > 0 (detections that localise *some* object).

Shape letters (docs/METHOD.md, "Shape letters"): D = detections (of one image, or of the whole
dataset where said), G = ground-truth boxes of one image.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import stats

from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou
from detectron2.utils import comm

__all__ = [
    "MATCHING_RULE",
    "ScoreIoUEvaluator",
    "correlations",
    "correlations_by_rule",
    "ground_truth_of",
    "instances_from_coco_results",
    "match_detections",
    "nms_localisation_gap",
    "pearson",
    "precision_recall",
    "spearman",
    "summarize_nms_gap",
]

MATCHING_RULE = (
    "each detection takes the highest IoU with a ground-truth box of its own class (crowd boxes "
    "excluded); 0 if there is none; all detections above the model's score threshold are kept"
)

# ----------------------------------------------------------------------------------------------
# Matching and correlations (pure functions).
# ----------------------------------------------------------------------------------------------


def match_detections(
    pred_boxes: torch.Tensor,
    pred_classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Match each detection to the same-class ground-truth box it overlaps most.

    Args:
        pred_boxes (Tensor[D, 4]): detections, xyxy.
        pred_classes (Tensor[D]): long class of each detection.
        gt_boxes (Tensor[G, 4]): ground-truth boxes, xyxy, same coordinates as ``pred_boxes``.
        gt_classes (Tensor[G]): long class of each box.

    Returns:
        ious (Tensor[D] float): IoU with the matched box, 0 where there is none.
        matched (Tensor[D] long): index into the G boxes, -1 where IoU is 0.
            Among equal IoUs the lower index wins.
    """
    num_dets = pred_boxes.shape[0]
    if num_dets == 0 or gt_boxes.shape[0] == 0:
        return pred_boxes.new_zeros(num_dets), torch.full((num_dets,), -1, dtype=torch.long)
    iou = pairwise_iou(Boxes(pred_boxes.float()), Boxes(gt_boxes.float()))  # [D, G]
    same_class = pred_classes[:, None] == gt_classes[None, :]
    iou = torch.where(same_class, iou, torch.zeros_like(iou))
    best_iou, best_idx = iou.max(dim=1)
    matched = torch.where(best_iou > 0, best_idx, torch.full_like(best_idx, -1))
    return best_iou, matched


def precision_recall(
    detections: Sequence[Instances],
    ground_truth: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> Dict[str, float]:
    """
    Precision and recall of the detections a picture shows: those scoring at least
    ``score_threshold``. Per image and class, detections are taken by decreasing score and each
    claims the unclaimed ground-truth box it overlaps most if that IoU is >= ``iou_threshold``
    (a true positive); otherwise it is a false positive (the one-to-one rule of COCO/VOC).

    Args:
        detections: one ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``) per image.
        ground_truth: per image, ``(boxes Tensor[G, 4] xyxy, classes Tensor[G])``
            (:func:`ground_truth_of`), in the detections' coordinates.

    Returns:
        {"precision", "recall", "true_positives", "detections", "ground_truth"}; precision is
        1.0 with no detection, recall 1.0 with no ground truth.
    """
    tp = num_dets = num_gt = 0
    for inst, (gt_boxes, gt_classes) in zip(detections, ground_truth):
        inst = inst[inst.scores >= score_threshold]
        num_dets, num_gt = num_dets + len(inst), num_gt + len(gt_classes)
        if len(inst) == 0 or len(gt_classes) == 0:
            continue
        iou = pairwise_iou(Boxes(inst.pred_boxes.tensor.float()), Boxes(gt_boxes.float()))
        iou[inst.pred_classes[:, None] != gt_classes[None, :]] = 0.0  # [D, G]
        claimed = torch.zeros(len(gt_classes), dtype=torch.bool)
        for d in torch.argsort(inst.scores, descending=True).tolist():
            best_iou, g = iou[d].masked_fill(claimed, 0.0).max(dim=0)
            if best_iou >= iou_threshold:
                claimed[g] = True
                tp += 1
    return {"precision": tp / num_dets if num_dets else 1.0,
            "recall": tp / num_gt if num_gt else 1.0,
            "true_positives": tp, "detections": num_dets, "ground_truth": num_gt}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """
    Pearson correlation of two equally long samples (``scipy.stats.pearsonr``).

    Args:
        x, y: array-likes of shape [D].

    Returns:
        float in [-1, 1]; NaN when D < 2 or either sample is constant (undefined).
    """
    x, y = _samples(x, y)
    return float(stats.pearsonr(x, y).statistic) if _defined(x, y) else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """
    Spearman rank correlation (``scipy.stats.spearmanr``; ties get their average rank).

    Args:
        x, y: array-likes of shape [D].

    Returns:
        float in [-1, 1]; NaN when undefined (D < 2 or a constant sample).
    """
    x, y = _samples(x, y)
    return float(stats.spearmanr(x, y).statistic) if _defined(x, y) else math.nan


def _samples(x, y) -> Tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    assert x.shape == y.shape and x.ndim == 1, (x.shape, y.shape)
    return x, y


def _defined(x: np.ndarray, y: np.ndarray) -> bool:
    """A correlation needs two points and two non-constant samples (scipy would warn and give
    NaN; asking first keeps the logs quiet)."""
    return len(x) >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0


def correlations(scores: Sequence[float], ious: Sequence[float]) -> Dict[str, Optional[float]]:
    """
    Args:
        scores, ious: array-likes of shape [D], one entry per detection.

    Returns:
        dict with ``num_detections`` (D), ``spearman``, ``pearson`` and ``mean_iou``; undefined
        values are None (so that the dict is valid JSON).
    """
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    return {
        "num_detections": int(len(scores)),
        "spearman": _finite_or_none(spearman(scores, ious)),
        "pearson": _finite_or_none(pearson(scores, ious)),
        "mean_iou": _finite_or_none(float(ious.mean())) if len(ious) else None,
    }


def correlations_by_rule(scores: Sequence[float], ious: Sequence[float]) -> Dict:
    """
    :func:`correlations` of all detections (top level) and of those with IoU > 0 (``iou_positive``).

    Args:
        scores, ious: array-likes of shape [D].

    Returns:
        dict: ``rule``, the keys of :func:`correlations`, and ``iou_positive`` (same keys).
    """
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    positive = ious > 0
    return {
        "rule": MATCHING_RULE,
        **correlations(scores, ious),
        "iou_positive": correlations(scores[positive], ious[positive]),
    }


def ground_truth_of(record: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Non-crowd ground truth of a detectron2 dataset dict, in the image's original coordinates.

    Args:
        record: dataset dict with ``annotations`` (``bbox``, ``bbox_mode``, ``category_id``
            contiguous, optional ``iscrowd``).

    Returns:
        boxes (Tensor[G, 4] float, xyxy), classes (Tensor[G] long).
    """
    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    classes = [a["category_id"] for a in annos]
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(classes, dtype=torch.long))


def instances_from_coco_results(results: List[Dict], records: List[Dict],
                                id_map: Dict[int, int]) -> List[Instances]:
    """
    The detections COCOEvaluator saved (``coco_instances_results.json``) as one ``Instances``
    per dataset record, so that a picture or a precision/recall needs no second inference.

    Args:
        results: COCO result entries (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``).
        records: the dataset's dicts, in the order wanted.
        id_map: ``thing_dataset_id_to_contiguous_id`` of the dataset's metadata.

    Returns:
        per record, ``Instances`` with ``pred_boxes`` (xyxy), ``scores``, ``pred_classes``.
    """
    by_image = {d["image_id"]: [] for d in records}
    for r in results:
        by_image[r["image_id"]].append(r)
    out = []
    for d in records:
        rows = by_image[d["image_id"]]
        inst = Instances((d["height"], d["width"]))
        boxes = torch.tensor([r["bbox"] for r in rows], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        inst.scores = torch.tensor([r["score"] for r in rows], dtype=torch.float32)
        inst.pred_classes = torch.tensor([id_map[r["category_id"]] for r in rows],
                                         dtype=torch.long)
        out.append(inst)
    return out


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Collection during inference.
# ----------------------------------------------------------------------------------------------


class ScoreIoUEvaluator(DatasetEvaluator):
    """
    Collects (score, IoU with the matched ground truth, class) for every detection during
    ``inference_on_dataset``; ``evaluate()`` returns ``{"consistency": correlations_by_rule}``.
    The collected arrays stay readable afterwards as ``scores``, ``ious`` and ``classes`` ([D], the whole dataset).
    """

    def __init__(self, dataset_dicts: List[Dict]):
        """
        Args:
            dataset_dicts: the dataset's dicts (with annotations), looked up by ``image_id``;
                the test loader's inputs carry no annotations.
        """
        self._gt = {d["image_id"]: d for d in dataset_dicts}
        self.reset()

    def reset(self):
        self._chunks = []
        self.scores = self.ious = self.classes = np.zeros(0)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            # Outputs are in original image coordinates (the mapper's height/width), like the GT.
            inst: Instances = out["instances"].to("cpu")
            gt_boxes, gt_classes = ground_truth_of(self._gt[inp["image_id"]])
            ious, _ = match_detections(inst.pred_boxes.tensor, inst.pred_classes, gt_boxes,
                                       gt_classes)
            self._chunks.append(np.stack([inst.scores.numpy(), ious.numpy(),
                                          inst.pred_classes.numpy()], axis=1).reshape(-1, 3))

    def evaluate(self):
        chunks = comm.gather(self._chunks, dst=0)
        if not comm.is_main_process():
            return {}
        rows = [c for part in chunks for c in part]
        table = np.concatenate(rows, axis=0) if rows else np.zeros((0, 3))
        self.scores, self.ious, self.classes = table[:, 0], table[:, 1], table[:, 2].astype(int)
        return {"consistency": correlations_by_rule(self.scores, self.ious)}


# ----------------------------------------------------------------------------------------------
# What NMS keeps: the paper's claim that IoU-coupled scores rank boxes by localisation quality.
# ----------------------------------------------------------------------------------------------


def nms_localisation_gap(
    cand_boxes: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    iou_threshold: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    For each ground-truth box, among the pre-NMS candidates of its class that overlap it with
    IoU >= ``iou_threshold``: the IoU of the highest-scoring one (the one NMS keeps: no
    candidate of that cluster outranks it) and the best IoU among them. If scores ranked boxes
    by localisation quality, the two would be equal.

    Args:
        cand_boxes (Tensor[D, 4]): candidates before NMS, xyxy; cand_scores (Tensor[D]);
            cand_classes (Tensor[D] long).
        gt_boxes (Tensor[G, 4]) xyxy, gt_classes (Tensor[G] long): same coordinates.
        iou_threshold: IoU for a candidate to count as a detection of the box.

    Returns:
        kept_iou, best_iou (Tensor[G] float): NaN for boxes without such a candidate. Among
        equal scores the lower candidate index is taken as kept.
    """
    num_gt = gt_boxes.shape[0]
    nan = torch.full((num_gt,), float("nan"))
    if num_gt == 0 or cand_boxes.shape[0] == 0:
        return nan, nan.clone()
    iou = pairwise_iou(Boxes(gt_boxes.float()), Boxes(cand_boxes.float()))  # [G, D]
    valid = (iou >= iou_threshold) & (gt_classes[:, None] == cand_classes[None, :])
    masked = torch.where(valid, cand_scores[None, :].float(), torch.tensor(-float("inf")))
    kept = iou.gather(1, masked.argmax(dim=1, keepdim=True)).squeeze(1)
    best = torch.where(valid, iou, torch.zeros_like(iou)).max(dim=1).values
    has = valid.any(dim=1)
    return torch.where(has, kept, nan), torch.where(has, best, nan)


def summarize_nms_gap(kept_iou: torch.Tensor, best_iou: torch.Tensor,
                      worse_by: float = 0.05) -> Dict:
    """
    Args:
        kept_iou, best_iou (Tensor[G]): :func:`nms_localisation_gap` outputs over a dataset.
        worse_by: IoU margin for the fraction of boxes whose kept candidate is clearly worse.

    Returns:
        dict: ``num_gt``, ``num_gt_with_candidates``, ``mean_iou_lost`` (mean of best - kept
        over boxes with candidates), ``fraction_worse_0.05`` (of those boxes), ``mean_kept_iou``.
    """
    has = ~torch.isnan(best_iou)
    lost = (best_iou - kept_iou)[has].double()
    n = int(has.sum())
    return {
        "num_gt": int(best_iou.numel()),
        "num_gt_with_candidates": n,
        "mean_iou_lost": float(lost.mean()) if n else None,
        f"fraction_worse_{worse_by:g}": float((lost >= worse_by - 1e-12).double().mean()) if n
        else None,
        "mean_kept_iou": float(kept_iou[has].double().mean()) if n else None,
    }
