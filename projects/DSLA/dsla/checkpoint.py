"""Reading and writing weights with the checks a user needs, on top of detectron2's
``DetectionCheckpointer``.

- A missing or unreadable (e.g. truncated) file stops with one line naming it.
- Evaluation, prediction and the tools load strictly: a checkpoint whose shapes or keys do not
  fit the model stops with the mismatched key, both shapes and both class counts, instead of
  running a randomly initialised head. Training (fine-tuning) may re-initialise mismatched
  parameters, with one warning listing them.
- Training checkpoints record the training set's class names (:class:`ClassNames`).
- The authors' mmdetection checkpoints load as they are: recognised by their keys and converted
  in memory with the strict rules of ``dsla-convert-mmdet`` (:mod:`dsla.convert`), their
  ``meta["CLASSES"]`` as the class names; a file that does not fit the config's model stops with
  one line saying what the file is and which config fits it.
- ``--resume`` falls back to the newest readable checkpoint of OUTPUT_DIR when the one named in
  ``last_checkpoint`` is missing or unreadable, and says so.
"""
import logging
import os
import zipfile
from typing import Collection, List, Mapping, Optional, Sequence

import torch

from detectron2.checkpoint import DetectionCheckpointer

from .convert import (
    UNREADABLE,
    ConversionError,
    convert_mmdet_state_dict,
    extract_state_dict,
    is_mmdet_checkpoint,
    layout_name,
    load_error,
    mismatch_message,
    mmdet_class_names,
    model_shapes,
    to_detectron2_checkpoint,
)
from .errors import UserError

__all__ = ["ClassNames", "DSLACheckpointer", "checkpoint_files", "checkpoint_num_classes",
           "load_weights", "mmdet_to_detectron2"]

logger = logging.getLogger("dsla")

_CLASSIFIER_BIAS = "cls_score.bias"
_CLASSIFIER = ("cls_score.weight", _CLASSIFIER_BIAS)
_MMDET_CLASSIFIER_BIAS = "bbox_head.conv_cls.bias"


class ClassNames:
    """A checkpointable that writes the training set's class names into every checkpoint (key
    ``class_names``), so that prediction and the tools can name the classes of the model."""

    def __init__(self, names: Optional[Sequence[str]]):
        self.names = list(names) if names else None

    def state_dict(self):
        return {"thing_classes": self.names}

    def load_state_dict(self, state):
        pass  # a resumed run names its classes from its own datasets


def mmdet_to_detectron2(checkpoint: Mapping, expected_shapes: Mapping[str, torch.Size],
                        may_differ: Collection[str] = ()) -> dict:
    """
    The detectron2 checkpoint of a loaded mmdetection DSLA checkpoint: its state dict converted
    strictly (:func:`dsla.convert.convert_mmdet_state_dict`) and its ``meta["CLASSES"]`` recorded
    as :class:`ClassNames` records a training set's names.

    Args:
        checkpoint: the loaded file (``{"state_dict", "meta", ...}`` or a bare state dict).
        expected_shapes: ``{key: shape}`` of the model to load it into.
        may_differ: model keys whose shape may differ (passed with the checkpoint's shape).

    Raises:
        ConversionError: the checkpoint does not fit the model.
    """
    state = convert_mmdet_state_dict(extract_state_dict(checkpoint), expected_shapes, may_differ)
    names = ClassNames(mmdet_class_names(checkpoint))
    return to_detectron2_checkpoint(state, class_names=names.state_dict())


class DSLACheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` with one-line errors for missing / unreadable files, strict shape
    checks (``strict=True``) or one warning for re-initialised parameters (``strict=False``),
    ``--resume`` falling back to an older readable checkpoint, and the authors' mmdetection
    checkpoints converted as they are read (``_load_file``, detectron2's place for foreign
    formats).
    """

    def __init__(self, model, save_dir="", *, strict=True, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict
        self._path = None

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise UserError(f"checkpoint file not found: {path}")
        self._path = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except UNREADABLE as e:
            raise load_error(filename, e, "If it is an mmdetection checkpoint you trust, convert "
                             "it with dsla-convert-mmdet --allow-pickle and use the file it "
                             "writes.") from e
        # DetectionCheckpointer wraps a file without a "model" entry as {"model": file}.
        if is_mmdet_checkpoint(loaded.get("model")):
            return self._convert_mmdet(filename, loaded["model"])
        return loaded

    def _convert_mmdet(self, filename: str, checkpoint: Mapping) -> dict:
        """The detectron2 checkpoint of an mmdetection file, for this checkpointer's model."""
        expected = model_shapes(self.model)
        # A classifier of another class count passes through to _load_model, which stops
        # (strict) or re-initialises it with a warning (fine-tuning), as for detectron2 files.
        classifier = [k for k in expected if k.endswith(_CLASSIFIER)]
        try:
            mmdet_state = extract_state_dict(checkpoint)
            converted = mmdet_to_detectron2(checkpoint, expected, may_differ=classifier)
        except ConversionError as e:
            if e.differences is None:
                raise UserError(f"checkpoint {filename}: {' '.join(str(e).split())}") from None
            raise UserError(mismatch_message(filename, mmdet_state, e.differences)) from None
        logger.info(f"{filename}: mmdetection checkpoint of {layout_name(mmdet_state)}, "
                    f"converted in memory ({len(converted['model'])} tensors)")
        return converted

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if incompatible.incorrect_shapes and self.strict:
            raise UserError(_shape_mismatch_message(self._path, incompatible.incorrect_shapes))
        if incompatible.missing_keys and self.strict:
            missing = incompatible.missing_keys
            raise UserError(f"checkpoint {self._path} has no weights for {len(missing)} parameters "
                            f"of the model (e.g. {missing[0]}): it is not a checkpoint of the "
                            "config's model.")
        if incompatible.incorrect_shapes:
            names = [k for k, _, _ in incompatible.incorrect_shapes]
            logger.warning(f"{self._path}: {len(names)} parameters do not fit the model and are "
                           f"re-initialised (fine-tuning): {', '.join(names)}")
        return incompatible

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or bool(checkpoint_files(self.save_dir))

    def get_checkpoint_file(self) -> str:
        """The checkpoint of ``last_checkpoint`` or, if it is missing or unreadable, the newest
        readable ``*.pth`` of the folder (with a warning naming both)."""
        named = super().get_checkpoint_file()
        if named and _is_readable(named):
            return named
        problem = (f"{named} (named in last_checkpoint) is "
                   + ("unreadable" if named and os.path.isfile(named) else "missing")
                   if named else f"{self.save_dir} has no last_checkpoint file")
        candidates = [p for p in checkpoint_files(self.save_dir) if _is_readable(p)]
        if not candidates:
            raise UserError(f"--resume: {problem} and {self.save_dir} holds no other readable "
                            "checkpoint; train without --resume into a new OUTPUT_DIR.")
        logger.warning(f"--resume: {problem}; resuming from {candidates[-1]} instead, the newest "
                       f"readable checkpoint in {self.save_dir}.")
        return candidates[-1]


def checkpoint_files(folder: str) -> List[str]:
    """The ``*.pth`` files of ``folder`` (a training's OUTPUT_DIR), oldest first."""
    if not folder or not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pth")]
    return sorted((p for p in paths if os.path.isfile(p)), key=os.path.getmtime)


def _is_readable(path: str) -> bool:
    """A cheap test for a complete ``torch.save`` file: a zip archive with its central directory
    (written last, so a truncated file has none)."""
    return os.path.isfile(path) and zipfile.is_zipfile(path)


def _shape_mismatch_message(path, incorrect_shapes) -> str:
    key, in_checkpoint, in_model = incorrect_shapes[0]
    more = f" (and {len(incorrect_shapes) - 1} more keys)" if len(incorrect_shapes) > 1 else ""
    message = (f"checkpoint {path} does not fit the config's model: {key} has shape "
               f"{tuple(in_checkpoint)} in the checkpoint, {tuple(in_model)} in the model{more}.")
    classes = [(c, m) for k, c, m in incorrect_shapes if k.endswith(_CLASSIFIER_BIAS)]
    if classes:
        (trained,), (configured,) = classes[0]
        message += (f" The checkpoint has {trained} classes, the config's NUM_CLASSES is "
                    f"{configured}.")
    return message


def load_weights(model, weights: str, strict: bool = True) -> Optional[List[str]]:
    """
    Load ``weights`` into ``model`` for evaluation or prediction.

    Args:
        model: a detectron2 model.
        weights: ``MODEL.WEIGHTS`` (a path or URL).
        strict: stop on mismatched shapes or missing keys.

    Returns:
        the class names recorded in the checkpoint by training, or None.

    Raises:
        UserError: missing or unreadable file; with ``strict``, weights that do not fit.
    """
    extra = DSLACheckpointer(model, strict=strict).load(weights)
    names = (extra.get("class_names") or {}).get("thing_classes")
    return list(names) if names else None


def checkpoint_num_classes(path: str) -> Optional[int]:
    """The class count of a local checkpoint (length of its classifier bias), or None when the
    file cannot tell (missing, unreadable, another layout). For messages only."""
    if not path or "://" in path or not _is_readable(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE:  # e.g. pickled objects that weights_only refuses: the file cannot tell
        return None
    if isinstance(state, dict):  # detectron2's {"model": ...}, mmdetection's {"state_dict": ...}
        state = state.get("model", state.get("state_dict", state))
    else:
        state = {}
    biases = [v for k, v in state.items()
              if k.endswith((_CLASSIFIER_BIAS, _MMDET_CLASSIFIER_BIAS))]
    return int(biases[0].shape[0]) if biases else None
