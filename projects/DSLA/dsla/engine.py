"""Training / evaluation entry point (``projects/DSLA/train_net.py`` and ``dsla-train``).

A thin layer over detectron2's ``DefaultTrainer``: COCO evaluation, whole-model gradient
clipping (the authors' recipe), CPU multi-process training, and a few user-facing checks.
"""
import logging
import os
import weakref

import torch
import torch.distributed as dist

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import (
    _create_gradient_clipper,
    _generate_optimizer_class_with_gradient_clipping,
    maybe_add_gradient_clipping,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import ClassNames, DSLACheckpointer, checkpoint_files, checkpoint_num_classes
from .cli import (
    add_register_coco_argument,
    check_weights,
    exit_on_user_error,
    load_config,
    mark_rank_user_error,
    register_datasets,
    write_json,
)
from .config import head_config_node
from .cpu_amp import CPUAutocast, uses_cpu_autocast
from .data import check_num_classes, check_training_data
from .errors import UserError

__all__ = ["Trainer", "argument_parser", "setup", "main", "cli"]

logger = logging.getLogger("dsla")


def _optimizer_class(cfg, optimizer_type):
    """
    ``optimizer_type`` with the gradient clipping of ``SOLVER.CLIP_GRADIENTS``: detectron2's
    per-parameter clipping ("value" / "norm"), or ``"full_model"``: the norm of all gradients
    together (mmdetection's ``grad_clip``, the authors' recipe) through detectron2's global
    clipper hook.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    return full_model_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)


def full_model_clipping(optimizer_type, max_norm: float, norm_type: float):
    """``optimizer_type`` that clips the norm of all gradients together before each step,
    through detectron2's global clipper hook (shared by the yacs and LazyConfig entries)."""
    norm = CfgNode({"CLIP_TYPE": "norm", "CLIP_VALUE": max_norm, "NORM_TYPE": norm_type})
    return _generate_optimizer_class_with_gradient_clipping(
        optimizer_type, global_clipper=_create_gradient_clipper(norm))


def cpu_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``; on a CPU (gloo) DDP needs ``device_ids=None``, where
    detectron2 would pin a GPU index."""
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def _training_class_names(cfg):
    """The class names of the first training set, recorded in every checkpoint."""
    names = [MetadataCatalog.get(d).get("thing_classes", None) for d in cfg.DATASETS.TRAIN]
    return names[0] if names and all(n == names[0] for n in names) else None


class Trainer(DefaultTrainer):
    """DefaultTrainer + COCOEvaluator, SGD/AdamW, ``CLIP_TYPE: "full_model"``, CPU DDP, bfloat16
    autocast on a CPU, and checkpoints that record the class names."""

    def __init__(self, cfg):
        # DefaultTrainer's construction, with three changes: DDP on a CPU (gloo) needs
        # device_ids=None (detectron2 pins a GPU index); SOLVER.AMP on a CPU trains in bfloat16
        # (dsla.cpu_amp; detectron2's AMPTrainer is CUDA-only); checkpoints go through
        # DSLACheckpointer.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = cpu_ddp_model(model, broadcast_buffers=False)
        if uses_cpu_autocast(cfg):
            self._trainer = SimpleTrainer(CPUAutocast(model), data_loader, optimizer)
        else:
            step = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
            self._trainer = step(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DSLACheckpointer(
            model, cfg.OUTPUT_DIR, strict=False, trainer=weakref.proxy(self),
            class_names=ClassNames(_training_class_names(cfg)))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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
    def build_train_loader(cls, cfg):
        try:
            return super().build_train_loader(cfg)
        except AssertionError as e:
            # detectron2's filter of images without annotations leaves nothing.
            if "No valid data found" not in str(e):
                raise
            raise UserError(f"No valid training data in {list(cfg.DATASETS.TRAIN)}: no image has "
                            "a usable box (DATALOADER.FILTER_EMPTY_ANNOTATIONS drops the others)."
                            ) from None

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
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
            write_json(path, results)  # NaN APs (absent size ranges) as null
            logger.info(f"Evaluation results written to {path}")
        return results


def argument_parser():
    """detectron2's default parser plus ``--register-coco NAME JSON_FILE IMAGE_ROOT`` and
    ``--overwrite``."""
    parser = default_argument_parser()
    add_register_coco_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch into an OUTPUT_DIR that holds a previous run's "
                        "checkpoints (they are replaced as training writes new ones)")
    return parser


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


def _check_fresh_training(cfg, args) -> None:
    """A new training must not silently replace a previous run's checkpoints; a backbone
    trained with frozen layers needs weights to freeze."""
    if args.eval_only or args.resume or args.overwrite:
        return
    previous = checkpoint_files(cfg.OUTPUT_DIR)
    if previous:
        raise UserError(
            f"OUTPUT_DIR {cfg.OUTPUT_DIR} already holds a training run "
            f"({os.path.basename(previous[-1])}): pass --resume to continue it, set OUTPUT_DIR "
            "to a new folder, or pass --overwrite to start over there.")
    frozen = cfg.MODEL.BACKBONE.FREEZE_AT > 0 or cfg.MODEL.RESNETS.NORM == "FrozenBN"
    if not cfg.MODEL.WEIGHTS and frozen:
        logger.warning(
            "MODEL.WEIGHTS is empty but the backbone keeps layers frozen (MODEL.BACKBONE."
            f"FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT}, MODEL.RESNETS.NORM = "
            f"{cfg.MODEL.RESNETS.NORM}): they stay at their random initialisation. Pass ImageNet "
            "weights as MODEL.WEIGHTS.")


def setup(args):
    """Config from ``args`` (defaults, DSLA keys, yaml, ``KEY VALUE`` overrides), logging, datasets."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # detectron2 sets up its own loggers only; ours (and dsla.data's warnings) go to the same log.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dsla", abbrev_name="dsla")
    register_datasets(args)
    _check_datasets(cfg, args)
    _check_fresh_training(cfg, args)
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
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    _log_rank_agreement(trainer.model)
    return results


def leave_process_group() -> None:
    """Wait for every rank, then destroy the process groups (no-op without an initialised one).

    Left to interpreter shutdown, gloo's worker threads can outlive Python and abort a rank
    ("terminate called without an active exception", pytorch/pytorch#190489); detectron2's
    ``launch`` does not destroy them. Called only after this rank succeeded. If another rank
    failed, the barrier fails too (gloo: "Connection closed by peer" within seconds) or, with
    NCCL across machines, waits up to the process group's timeout (``launch``: 30 minutes):
    the price of never destroying a group that a peer still uses. On one machine ``launch``
    ends the waiting ranks as soon as one fails, and reports the first failure it sees."""
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def run_then_leave_group(main_func, args):
    """``main_func(args)``, then :func:`leave_process_group`: what ``launch`` runs per rank. In a
    multi-process run a :class:`UserError` is re-raised marked, so that the parent process (which
    only gets the rank's traceback text) can still end with the one-line message."""
    try:
        results = main_func(args)
    except UserError as e:
        if comm.get_world_size() == 1 or os.environ.get("DSLA_TRACEBACK"):
            raise
        raise mark_rank_user_error(e) from e
    leave_process_group()
    return results


def cli(argv=None):
    """Command-line entry point: parse, then ``launch`` one process per device. A
    :class:`UserError` ends with one line; any other exception keeps its traceback."""
    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    with exit_on_user_error():
        return launch(run_then_leave_group, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(main, args))
