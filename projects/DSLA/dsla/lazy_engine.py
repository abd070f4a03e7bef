"""LazyConfig training / evaluation entry point (``dsla-lazy-train``).

detectron2's ``tools/lazyconfig_train_net.py`` for the Python configs under ``configs/lazy/``, with
what the yacs entry (:mod:`dsla.engine`, the reference) adds: whole-model gradient clipping
(``train.grad_clip``), bfloat16 autocast on a CPU (``train.amp.enabled`` with ``train.device:
cpu``), CPU multi-process training, ``eval_results.json``, ``--register-coco``, one run per
output folder (:mod:`dsla.run_dir`; ``--eval-only`` writes into its ``eval`` subfolder) and the
checks a user needs (config file, overrides, weights, number of classes, training data), each
ending in one line. The command line itself is :func:`dsla.cli.training_cli`, as for the yacs
entry.

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
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from .checkpoint import DSLACheckpointer
from .cli import (
    check_options_first,
    check_weights,
    log_rank_agreement,
    register_datasets,
    training_cli,
    write_json,
)
from .cpu_amp import CPUAutocast
from .data import check_num_classes, check_training_data
from .engine import cpu_ddp_model, full_model_clipping
from .errors import UserError
from .run_dir import log_details, open_run, run_folder, setup_terminal_logging

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
    check_options_first(overrides)
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


def _dataset_names(cfg, split):
    """Names of the datasets the config's ``split`` ("train", "test") loader reads."""
    loader = cfg.get("dataloader", {}).get(split)
    if loader is None or "names" not in loader.get("dataset", {}):
        return []
    value = loader.dataset.names
    return [value] if isinstance(value, str) else list(value)


def _check_datasets(cfg, args) -> None:
    """The class count of the datasets, and for training that there is data to train on."""
    train, test = _dataset_names(cfg, "train"), _dataset_names(cfg, "test")
    if "num_classes" in cfg.model:
        try:
            check_num_classes(cfg.model.num_classes, test if args.eval_only else train + test)
        except ValueError as e:
            raise UserError(f"model.num_classes = {cfg.model.num_classes}: {e}") from None
    if train and not args.eval_only:
        check_training_data(train)


def setup(args):
    """Config from ``args`` (file, overrides), ``--register-coco`` datasets and the checks; then
    the run's folder (train.output_dir; ``--eval-only``: its ``eval`` subfolder): its lock, log
    and config.yaml, as with the yacs entry."""
    setup_terminal_logging()
    cfg = load_lazy_config(args.config_file, args.opts)
    register_datasets(args)
    _check_datasets(cfg, args)
    open_run(cfg.train.output_dir, args, lambda path: LazyConfig.save(cfg, path),
             cfg.train.get("seed", -1), cfg.train.get("cudnn_benchmark", False))
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
    log_details("Model", str(model))
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
    log_rank_agreement(model)


def main(args):
    cfg = setup(args)
    if not args.eval_only:
        return do_train(args, cfg)
    check_weights(cfg.train.init_checkpoint, "--eval-only", key="train.init_checkpoint",
                  assign="=")
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    # Strict, like the yacs entry: a checkpoint that does not fit (e.g. another class count)
    # stops with one line instead of evaluating a randomly initialised head.
    DSLACheckpointer(model, save_dir=cfg.train.output_dir, strict=True).resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume)
    cfg.train.output_dir = run_folder(cfg.train.output_dir, True)  # results, detections
    return do_test(cfg, cpu_ddp_model(model))


def cli(argv=None):
    """Command-line entry point: the yacs entry's arguments, ``launch`` one process per device;
    a user error ends in one line."""
    return training_cli(main, argv)


if __name__ == "__main__":
    cli()
