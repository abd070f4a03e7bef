"""Training / evaluation entry point (``projects/DSLA/train_net.py`` and ``dsla-train``).

A thin layer over detectron2's ``DefaultTrainer``: COCO evaluation, whole-model gradient
clipping (the authors' recipe), CPU multi-process training, bfloat16 autocast on a CPU,
checkpoints that record the class names, one run per OUTPUT_DIR, and the checks a user needs.
"""
import contextlib
import logging
import os
import warnings
import weakref

import torch

import detectron2.engine.defaults as d2_defaults
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.modeling import build_model
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm

from .checkpoint import ClassNames, DSLACheckpointer, checkpoint_num_classes
from .cli import (
    argument_parser,
    check_weights,
    load_config,
    log_rank_agreement,
    register_datasets,
    training_cli,
    write_json,
)
from .config import head_config_node
from .cpu_amp import CPUAutocast, uses_cpu_autocast
from .data import check_num_classes, check_training_data
from .errors import UserError
from .run_dir import log_details, open_run, run_folder, setup_terminal_logging

__all__ = ["Trainer", "argument_parser", "setup", "main", "cli"]

logger = logging.getLogger("dsla")


def _optimizer_class(cfg, optimizer_type):
    """
    ``optimizer_type`` with the gradient clipping of ``SOLVER.CLIP_GRADIENTS``: detectron2's
    per-parameter clipping ("value" / "norm"), or ``"full_model"``: the norm of all gradients
    together (mmdetection's ``grad_clip``, the authors' recipe).
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    return full_model_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)


def full_model_clipping(optimizer_type, max_norm: float, norm_type: float):
    """``optimizer_type`` whose ``step`` first clips the norm of all its parameters' gradients
    together to ``max_norm`` (shared by the yacs and LazyConfig entries); named as detectron2
    names its clipping optimizers."""

    class OptimizerWithGradientClip(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    OptimizerWithGradientClip.__name__ = f"{optimizer_type.__name__}WithGradientClip"
    return OptimizerWithGradientClip


def cpu_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``; on a CPU (gloo) DDP needs ``device_ids=None``, where
    detectron2 would pin a GPU index."""
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _default_trainer_on_a_cpu(cfg):
    """What ``DefaultTrainer.__init__`` needs to run on a CPU: it wraps the model with
    ``detectron2.engine.defaults.create_ddp_model``, which pins ``device_ids`` (DDP refuses them
    for a CPU model): there, that name is :func:`cpu_ddp_model` meanwhile. With ``SOLVER.AMP`` it
    builds an ``AMPTrainer`` (replaced, see ``Trainer.build_hooks``), whose GradScaler warns that
    CUDA is missing."""
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = cpu_ddp_model
    try:
        with warnings.catch_warnings():
            if uses_cpu_autocast(cfg):
                warnings.filterwarnings("ignore", message=".*GradScaler.*")
            yield
    finally:
        d2_defaults.create_ddp_model = original


def _training_class_names(cfg):
    """The class names of the first training set, recorded in every checkpoint."""
    names = [MetadataCatalog.get(d).get("thing_classes", None) for d in cfg.DATASETS.TRAIN]
    return names[0] if names and all(n == names[0] for n in names) else None


class Trainer(DefaultTrainer):
    """DefaultTrainer + COCOEvaluator, SGD/AdamW, ``CLIP_TYPE: "full_model"``, CPU DDP, bfloat16
    autocast on a CPU, and checkpoints that record the class names."""

    def __init__(self, cfg):
        with _default_trainer_on_a_cpu(cfg):
            super().__init__(cfg)

    def build_hooks(self):
        """DefaultTrainer's hooks. ``DefaultTrainer.__init__`` calls this last, after building its
        step and checkpointer and before the hooks take them; so here ``SOLVER.AMP`` on a CPU
        becomes bfloat16 autocast in a SimpleTrainer (dsla.cpu_amp; detectron2's AMPTrainer is
        CUDA-only), and the checkpointer a DSLACheckpointer (checkpoints record class names)."""
        if uses_cpu_autocast(self.cfg):
            step = self._trainer  # detectron2's delegate of model, data_loader and optimizer
            self._trainer = SimpleTrainer(CPUAutocast(step.model), step.data_loader,
                                          step.optimizer)
        self.checkpointer = DSLACheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, strict=False,
            trainer=weakref.proxy(self),
            class_names=ClassNames(_training_class_names(self.cfg)))
        return super().build_hooks()

    def resume_or_load(self, resume=True):
        """As DefaultTrainer's, but a resumed checkpoint must fit the model exactly: resuming
        continues the same run, so a checkpoint of another model in OUTPUT_DIR (e.g. another
        class count) is a user error, not a silently re-initialised head. Fine-tuning from
        MODEL.WEIGHTS keeps re-initialising what does not fit (with a warning)."""
        resuming = resume and self.checkpointer.has_checkpoint()
        self.checkpointer.strict = resuming
        try:
            super().resume_or_load(resume=resume)
        except UserError as e:
            if not resuming or str(e).startswith("--resume"):
                raise
            raise UserError(f"--resume: {e} Resuming continues the run in OUTPUT_DIR "
                            f"{self.cfg.OUTPUT_DIR}: train into a new OUTPUT_DIR (dsla-demo: "
                            "--output DIR), or move that folder away.") from None
        finally:
            self.checkpointer.strict = False

    @classmethod
    def build_model(cls, cfg):
        """detectron2's ``build_model``; the model's printout goes to the run's log.txt only."""
        model = build_model(cfg)
        log_details("Model", str(model))
        count = sum(p.numel() for p in model.parameters())
        logger.info(f"Model: {type(model).__name__}, {count:,} parameters (printed in log.txt)")
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """
        detectron2's SGD (``SOLVER.OPTIMIZER: "SGD"``) or AdamW (``"ADAMW"``, used for the
        from-scratch CPU configs), both with detectron2's per-parameter lr / weight decay rules
        and ``SOLVER.CLIP_GRADIENTS`` (``CLIP_TYPE: "full_model"`` clips the norm of all
        gradients together).
        """
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name not in ("SGD", "ADAMW"):
            raise UserError(
                f"Invalid SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r}: use SGD or ADAMW.")
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            overrides={n: {"weight_decay": 0.0} for n in cfg.SOLVER.NO_WEIGHT_DECAY_PARAMS},
        )
        if name == "SGD":  # detectron2's build_optimizer's arguments
            return _optimizer_class(cfg, torch.optim.SGD)(
                params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True)
        return _optimizer_class(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def test(cls, cfg, model, evaluators=None, output_folder=None):
        """DefaultTrainer's evaluation on ``DATASETS.TEST``; the results also go to
        ``eval_results.json`` in ``output_folder`` (default OUTPUT_DIR), which also holds the
        evaluators' files (``inference/<dataset>/``) when given."""
        folder = output_folder or cfg.OUTPUT_DIR
        if evaluators is None and output_folder:
            evaluators = [cls.build_evaluator(cfg, name, os.path.join(folder, "inference", name))
                          for name in cfg.DATASETS.TEST]
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            path = os.path.join(folder, "eval_results.json")
            write_json(path, results)  # NaN APs (absent size ranges) as null
            logger.info(f"Evaluation results written to {path}")
        return results


def _num_classes_key(cfg):
    name, node = head_config_node(cfg)
    return (f"{name}.NUM_CLASSES", node.NUM_CLASSES) if node else (None, None)


def _check_datasets(cfg, args) -> None:
    """The class count of the datasets this command uses (``--eval-only``: the test sets only,
    naming the checkpoint's class count too) and, for training, that there is data to train on."""
    key, num_classes = _num_classes_key(cfg)
    names = list(cfg.DATASETS.TEST) if args.eval_only else [*cfg.DATASETS.TRAIN,
                                                             *cfg.DATASETS.TEST]
    if key:
        try:
            check_num_classes(num_classes, names, key=key)
        except UserError as e:
            trained = checkpoint_num_classes(cfg.MODEL.WEIGHTS) if args.eval_only else None
            if trained is None:
                raise
            raise UserError(f"{e} (MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} has {trained} classes.)"
                            ) from None
    if not args.eval_only:
        check_training_data(cfg.DATASETS.TRAIN)


def _warn_frozen_random_backbone(cfg, args) -> None:
    """A backbone trained with frozen layers needs weights to freeze."""
    if args.eval_only or args.resume:
        return
    frozen = cfg.MODEL.BACKBONE.FREEZE_AT > 0 or cfg.MODEL.RESNETS.NORM == "FrozenBN"
    if not cfg.MODEL.WEIGHTS and frozen:
        logger.warning(
            "MODEL.WEIGHTS is empty but the backbone keeps layers frozen (MODEL.BACKBONE."
            f"FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT}, MODEL.RESNETS.NORM = "
            f"{cfg.MODEL.RESNETS.NORM}): they stay at their random initialisation. Pass ImageNet "
            "weights as MODEL.WEIGHTS.")


def _check_batch_and_input(cfg) -> None:
    """Values detectron2 only asserts on, deep in building the data loader."""
    batch, world = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if batch <= 0 or batch % world:
        raise UserError(f"SOLVER.IMS_PER_BATCH = {batch}: the total batch size must be a positive "
                        f"multiple of the number of processes ({world}).")
    sampling, sizes = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, cfg.INPUT.MIN_SIZE_TRAIN
    if sampling not in ("choice", "range"):
        raise UserError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING = {sampling!r}: use 'choice' or 'range'.")
    if sampling == "range" and len(sizes) != 2:
        raise UserError(f"INPUT.MIN_SIZE_TRAIN = {tuple(sizes)} with INPUT.MIN_SIZE_TRAIN_SAMPLING "
                        "'range' needs two sizes (smallest, largest).")


def setup(args):
    """
    Config from ``args`` (defaults, DSLA keys, yaml, ``KEY VALUE`` overrides), datasets and the
    checks; then the run's folder (OUTPUT_DIR; ``--eval-only``: OUTPUT_DIR/eval): its lock, log
    and config.yaml. A run refused by a check writes nothing there.
    """
    setup_terminal_logging()
    cfg = load_config(args.config_file, args.opts)
    register_datasets(args)
    if not args.eval_only:
        _check_batch_and_input(cfg)
    _check_datasets(cfg, args)

    def save_config(path):
        with open(path, "w") as f:
            f.write(cfg.dump())

    open_run(cfg.OUTPUT_DIR, args, save_config, cfg.SEED, cfg.CUDNN_BENCHMARK)
    _warn_frozen_random_backbone(cfg, args)
    return cfg


def _eval_weights(cfg, args, checkpointer) -> str:
    """The checkpoint ``--eval-only`` evaluates: OUTPUT_DIR's last one with ``--resume`` (if
    any), else MODEL.WEIGHTS; both given and different is a contradiction, not a choice."""
    if args.resume and checkpointer.has_checkpoint():
        last = checkpointer.get_checkpoint_file()
        given = "MODEL.WEIGHTS" in args.opts[::2] and cfg.MODEL.WEIGHTS
        if given and os.path.realpath(cfg.MODEL.WEIGHTS) != os.path.realpath(last):
            raise UserError(
                f"--eval-only --resume evaluates {last} (the last checkpoint of OUTPUT_DIR), but "
                f"MODEL.WEIGHTS is {cfg.MODEL.WEIGHTS}: drop --resume to evaluate "
                f"{cfg.MODEL.WEIGHTS} (into another OUTPUT_DIR), or drop MODEL.WEIGHTS.")
        return last
    check_weights(cfg.MODEL.WEIGHTS, "--eval-only")
    return cfg.MODEL.WEIGHTS


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DSLACheckpointer(model, save_dir=cfg.OUTPUT_DIR)  # strict: no random head
        checkpointer.load(_eval_weights(cfg, args, checkpointer))
        results = Trainer.test(cfg, model, output_folder=run_folder(cfg.OUTPUT_DIR, True))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    log_rank_agreement(trainer.model)
    return results


def cli(argv=None):
    """Command-line entry point: parse, then ``launch`` one process per device. A
    :class:`UserError` ends with one line; any other exception keeps its traceback."""
    return training_cli(main, argv)
