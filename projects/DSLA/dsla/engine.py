"""Training / evaluation entry point (``projects/DSLA/train_net.py`` and ``dsla-train``).

A thin layer over detectron2's ``DefaultTrainer``: COCO evaluation, whole-model gradient
clipping (the authors' recipe), CPU multi-process training, and a few user-facing checks.
"""
import json
import logging
import os
from unittest import mock

import torch

import detectron2.engine.defaults as d2_defaults
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .cli import check_weights, exit_on_user_error, load_config
from .cpu_amp import CPUAutocast, uses_cpu_autocast
from .data import check_num_classes, register_coco_dataset

__all__ = ["Trainer", "argument_parser", "setup", "main", "cli"]

logger = logging.getLogger("dsla")


_d2_create_ddp_model = d2_defaults.create_ddp_model


def _create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``, with ``device_ids=None`` for CPU (gloo) training."""
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, **kwargs)


def _with_full_model_clipping(optimizer, max_norm: float, norm_type: float):
    """Clip the gradient norm of all parameters together before each step (mmdetection's
    ``grad_clip``), rather than per parameter as detectron2's built-in clipping does."""

    class FullModelGradientClipping(type(optimizer)):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    optimizer.__class__ = FullModelGradientClipping
    return optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer + COCOEvaluator, SGD/AdamW, ``CLIP_TYPE: "full_model"`` and CPU DDP."""

    def __init__(self, cfg):
        cpu_amp = uses_cpu_autocast(cfg)
        if cpu_amp:  # detectron2's AMPTrainer is CUDA-only: train in bfloat16 with dsla.cpu_amp
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = False
            cfg.freeze()
        # detectron2 pins DDP to a GPU index; on CPU (gloo) DDP needs device_ids=None.
        with mock.patch.object(d2_defaults, "create_ddp_model", _create_ddp_model):
            super().__init__(cfg)
        if cpu_amp:
            self._trainer.model = CPUAutocast(self._trainer.model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """
        detectron2's SGD (``SOLVER.OPTIMIZER: "SGD"``) or AdamW (``"ADAMW"``, used for the
        from-scratch CPU configs), both with detectron2's per-parameter lr / weight decay rules;
        ``CLIP_TYPE: "full_model"`` clips the norm of all gradients together.
        """
        clip = cfg.SOLVER.CLIP_GRADIENTS
        full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model"
        if full_model:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False  # detectron2 only knows "value" / "norm"
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            optimizer = super().build_optimizer(cfg, model)
        elif name == "ADAMW":
            params = get_default_optimizer_params(
                model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
                overrides={n: {"weight_decay": 0.0} for n in cfg.SOLVER.NO_WEIGHT_DECAY_PARAMS},
            )
            optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
                params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
            )
        else:
            raise ValueError(f"Invalid SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r}: use SGD or ADAMW.")
        if full_model:
            optimizer = _with_full_model_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
            with open(path, "w") as f:
                json.dump(results, f, indent=2)
            logger.info(f"Evaluation results written to {path}")
        return results


def argument_parser():
    """detectron2's default parser plus ``--register-coco NAME JSON_FILE IMAGE_ROOT``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable); use it in "
        "DATASETS.TRAIN / DATASETS.TEST",
    )
    return parser


def _num_classes_key(cfg):
    arch = cfg.MODEL.META_ARCHITECTURE
    node = {"DSLA": "DSLA", "FCOS": "FCOS"}.get(arch)
    return (f"MODEL.{node}.NUM_CLASSES", cfg.MODEL[node].NUM_CLASSES) if node else (None, None)


def setup(args):
    """Config from ``args`` (defaults, DSLA keys, yaml, ``KEY VALUE`` overrides), logging, datasets."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # detectron2 sets up its own loggers only; ours (and dsla.data's warnings) go to the same log.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dsla", abbrev_name="dsla")
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    key, num_classes = _num_classes_key(cfg)
    if key:
        try:
            check_num_classes(num_classes, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        except ValueError as e:
            raise ValueError(f"{key} = {num_classes}: {e}") from None
    return cfg


def _log_rank_agreement(model):
    """After distributed training every rank must hold the same weights; say so in the log."""
    if comm.get_world_size() == 1:
        return
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    sums = comm.all_gather(checksum)
    if comm.is_main_process():
        same = all(s == sums[0] for s in sums)
        log = logger.info if same else logger.error
        log(f"Parameter checksums of the {len(sums)} ranks: {sums} ({'equal' if same else 'DIFFER'})")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_weights(cfg.MODEL.WEIGHTS, "--eval-only")
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    _log_rank_agreement(trainer.model)
    return results


def cli(argv=None):
    """Command-line entry point: parse, then ``launch`` one process per device."""
    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    # A user error (bad config value, missing file) ends with one line, not a traceback.
    with exit_on_user_error():
        return launch(main, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
