"""LazyConfig training / evaluation entry point (``dsla-lazy-train``).

detectron2's ``tools/lazyconfig_train_net.py`` for the Python configs under ``configs/lazy/``, with
what the yacs entry (:mod:`dsla.engine`, the reference) adds: whole-model gradient clipping
(``train.grad_clip``), bfloat16 autocast on a CPU (``train.amp.enabled`` with ``train.device:
cpu``), CPU multi-process training, ``eval_results.json``, ``--register-coco`` and the checks a
user needs (config file, overrides, weights, number of classes), each ending in one line.

    dsla-lazy-train --config-file configs/lazy/Shapes/dsla_R_18_FPN_cpu.py
    dsla-lazy-train --config-file CFG.py --eval-only train.init_checkpoint=model_final.pth
    dsla-lazy-train --config-file CFG.py --num-gpus 8 --resume train.max_iter=1000
"""
import logging
import os
import warnings

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.registry import locate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .cli import exit_on_user_error, write_json
from .checkpoint import DSLACheckpointer
from .cpu_amp import CPUAutocast
from .data import check_num_classes, register_coco_dataset
from .engine import _log_rank_agreement, cpu_ddp_model, full_model_clipping, run_then_leave_group
from .engine import argument_parser
from .errors import UserError

__all__ = ["load_lazy_config", "setup", "do_test", "do_train", "main", "cli"]

logger = logging.getLogger("dsla")

# detectron2.model_zoo (get_config, used by the configs) imports pkg_resources, which recent
# setuptools flag as deprecated on every run; harmless here, so keep it out of users' logs.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

_ABSENT = object()


def load_lazy_config(config_file, overrides):
    """
    A LazyConfig from ``config_file`` (``.py``) with ``key=value`` overrides (Hydra's syntax;
    ``+key=value`` adds a key). A config asking for CUDA on a machine without it runs on the CPU.

    Raises:
        UserError: no such file, not a LazyConfig, or an override that does not parse or names a
            key the config does not have (yacs refuses those too; a typo would be ignored).
    """
    if not config_file or not os.path.isfile(config_file):
        raise UserError(f"config file not found: {config_file!r} (--config-file CONFIG.py)")
    if not config_file.endswith(".py"):
        raise UserError(f"{config_file}: dsla-lazy-train reads Python LazyConfigs (.py); "
                        "yacs configs (.yaml) run with dsla-train / projects/DSLA/train_net.py")
    cfg = LazyConfig.load(config_file)
    if "model" not in cfg or "train" not in cfg:
        raise UserError(f"{config_file} defines no `model` and `train`: not a DSLA LazyConfig")
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise UserError(f"invalid override in {list(overrides)}: {e}") from None
    for o in parsed:
        node = OmegaConf.select(cfg, o.key_or_group, default=_ABSENT,
                                throw_on_resolution_failure=False)
        if node is _ABSENT and not o.is_add():
            raise UserError(f"override {o.input_line}: {config_file} has no key "
                            f"{o.key_or_group} (write +{o.input_line} to add one)")
    LazyConfig.apply_overrides(cfg, list(overrides))
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"  # a GPU config still runs here, slowly
    return cfg


def _dataset_names(cfg):
    """Names of the datasets the config's loaders read (train, then test)."""
    names = []
    for split in ("train", "test"):
        loader = cfg.get("dataloader", {}).get(split)
        if loader is not None and "names" in loader.get("dataset", {}):
            value = loader.dataset.names
            names += [value] if isinstance(value, str) else list(value)
    return names


def setup(args):
    """Config from ``args`` (file, overrides), logging, ``--register-coco`` datasets, checks."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # detectron2 sets up its own loggers only; ours (and dsla.data's warnings) go to the same log.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="dsla",
                 abbrev_name="dsla")
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    if "num_classes" in cfg.model:
        try:
            check_num_classes(cfg.model.num_classes, _dataset_names(cfg))
        except ValueError as e:
            raise UserError(f"model.num_classes = {cfg.model.num_classes}: {e}") from None
    return cfg


def do_test(cfg, model):
    """COCO evaluation of ``model`` on ``dataloader.test``; results also go to
    ``train.output_dir/eval_results.json``, as with the yacs entry."""
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process() and results:
        print_csv_format(results)
        path = os.path.join(cfg.train.output_dir, "eval_results.json")
        write_json(path, results)  # strict JSON: an undefined AP is null, as with yacs
        logger.info(f"Evaluation results written to {path}")
    return results


def _build_optimizer(cfg, model):
    """``cfg.optimizer`` for ``model``, with whole-model clipping when ``train.grad_clip`` says so."""
    for key in ("optimizer", "lr_multiplier"):
        if key not in cfg:
            raise UserError(f"the config has no `{key}`: it is for inference only (--eval-only)")
    cfg.optimizer.params.model = model
    clip = cfg.train.get("grad_clip")
    if clip is not None and clip.enabled:
        target = cfg.optimizer._target_
        target = locate(target) if isinstance(target, str) else target
        cfg.optimizer._target_ = full_model_clipping(target, clip.max_norm, clip.norm_type)
    return instantiate(cfg.optimizer)


def _build_trainer(cfg, model):
    """detectron2's SimpleTrainer, or AMPTrainer for mixed precision on CUDA; on a CPU mixed
    precision is bfloat16 autocast of the training forward pass (dsla.cpu_amp), since
    AMPTrainer is CUDA-only."""
    optimizer = _build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    ddp = cpu_ddp_model(model, **cfg.train.ddp)
    if cfg.train.amp.enabled and cfg.train.device == "cpu":
        return SimpleTrainer(CPUAutocast(ddp), train_loader, optimizer), ddp
    trainer_class = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    return trainer_class(ddp, train_loader, optimizer), ddp


def do_train(args, cfg):
    """Train ``cfg.model`` as detectron2's ``lazyconfig_train_net.py`` does (same hooks), then
    evaluate; ``--resume`` continues from the last checkpoint in ``train.output_dir``."""
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)
    trainer, ddp = _build_trainer(cfg, model)
    # The bare model: checkpoints keep the key names of the yacs entry's.
    checkpointer = DSLACheckpointer(model, cfg.train.output_dir, strict=False, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main_process
        else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, ddp)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main_process else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # The checkpoint stores the iteration that just finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    _log_rank_agreement(model)


def _check_weights(weights):
    """Refuse to evaluate silently random weights."""
    if not weights:
        raise UserError("--eval-only needs trained weights: pass "
                        "train.init_checkpoint=/path/to/model.pth")
    if "://" not in weights and not os.path.isfile(weights):
        raise UserError(f"train.init_checkpoint file not found: {weights}")


def main(args):
    cfg = setup(args)
    if not args.eval_only:
        return do_train(args, cfg)
    _check_weights(cfg.train.init_checkpoint)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    # Strict, like the yacs entry: a checkpoint that does not fit (e.g. another class count)
    # stops with one line instead of evaluating a randomly initialised head.
    DSLACheckpointer(model, save_dir=cfg.train.output_dir, strict=True).resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume)
    return do_test(cfg, cpu_ddp_model(model))


def cli(argv=None):
    """Command-line entry point: parse (the yacs entry's arguments), then ``launch`` one process
    per device."""
    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    # A user error (bad config file, override or value) ends with one line, not a traceback.
    with exit_on_user_error():
        return launch(run_then_leave_group, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(main, args))


if __name__ == "__main__":
    cli()
