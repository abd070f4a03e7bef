"""LazyConfigs (configs/lazy/) against their yacs twins, the reference: the same networks (names,
shapes, frozen parameters; R-50: the same outputs and losses with the same weights) and, for the
training recipes, the same optimizer, schedule, clipping, data and run settings; and the checks
of dsla.lazy_engine.load_lazy_config."""
import glob
import os

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler

from conftest import REPO, make_inputs, tiny_cfg
from dsla.engine import Trainer
from dsla.errors import UserError
from dsla.lazy_engine import _build_optimizer, load_lazy_config

LAZY = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "lazy",
                                                                     "*", "*.py"))
              if os.sep + "common" + os.sep not in p)
TRAINING = ["configs/lazy/Shapes/dsla_R_18_FPN_cpu.py",
            "configs/lazy/COCO-Detection/dsla_R_50_FPN_1x.py"]
R50 = "configs/lazy/COCO-Detection/dsla_R_50_FPN_1x.py"


def yacs_twin(path, *opts):
    """The yacs config a LazyConfig restates: the same path under configs/, ``.yaml``."""
    twin = path.replace("configs/lazy/", "configs/").replace(".py", ".yaml")
    return tiny_cfg(*opts, config_file=os.path.join(REPO, twin))


def lazy(path):
    return LazyConfig.load(os.path.join(REPO, path))


def test_lazy_configs_found():
    assert len(LAZY) == 5 and set(TRAINING) <= set(LAZY), LAZY


@pytest.mark.parametrize("path", LAZY)
def test_lazy_model_is_the_yacs_model(path):
    """Same parameter and buffer names and shapes (converted checkpoints load by name), same
    frozen parameters, same head options."""
    ours, theirs = instantiate(lazy(path).model), build_model(yacs_twin(path))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    for attr in ("num_classes", "regress_ranges", "center_sampling_radius", "box_loss_type",
                 "cls_loss_weight", "input_format", "test_nms_thresh", "test_score_thresh"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.head.norm_on_bbox == theirs.head.norm_on_bbox
    assert ours.pixel_mean.flatten().tolist() == theirs.pixel_mean.flatten().tolist()
    assert ours.pixel_std.flatten().tolist() == theirs.pixel_std.flatten().tolist()


def test_r50_lazy_and_yacs_models_compute_the_same(storage):
    """With the yacs model's weights loaded, the lazy R-50 model gives the same detections and
    the same training losses on the same input."""
    theirs = build_model(yacs_twin(R50))
    ours = instantiate(lazy(R50).model)
    ours.load_state_dict(theirs.state_dict())
    batch = make_inputs([[[10, 20, 90, 100], [40, 8, 120, 60]]], [[3, 7]], size=128)
    with torch.no_grad():
        losses = [{k: v.item() for k, v in m(batch).items()} for m in (ours, theirs)]
        assert losses[0] == losses[1] and len(losses[0]) == 2
        for m in (ours, theirs):
            # Untrained scores sit at the prior (0.01): keep them to compare the detections.
            m.eval().test_score_thresh = 0.005
        a, b = ours(batch)[0]["instances"], theirs(batch)[0]["instances"]
    assert len(a) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    assert a.pred_classes.tolist() == b.pred_classes.tolist()


def _optimizer_settings(optimizer, model):
    """Per parameter name: every hyper-parameter of its group (lr, weight decay, betas, ...) but
    ``foreach``, a choice of kernels (detectron2's yacs SGD asks for it; same arithmetic)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v for k, v in g.items() if k not in ("params", "foreach")}
            for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("path", TRAINING)
def test_lazy_recipe_trains_as_the_yacs_recipe(path):
    """Optimizer (class, whole-model clipping, per-parameter lr and weight decay) and the lr of
    every iteration of the schedule."""
    cfg, yacs = lazy(path), yacs_twin(path)
    model = build_model(yacs)
    ours, theirs = _build_optimizer(cfg, model), Trainer.build_optimizer(yacs, model)
    assert type(ours).__mro__[1] is type(theirs).__mro__[1]  # AdamW / SGD under the clipping
    # Clipping optimizers named as detectron2 names them (full_model: dsla.engine.full_model_clipping).
    assert type(ours).__name__ == type(theirs).__name__ == f"{type(ours).__mro__[1].__name__}WithGradientClip"
    assert cfg.train.grad_clip.max_norm == yacs.SOLVER.CLIP_GRADIENTS.CLIP_VALUE
    assert _optimizer_settings(ours, model) == _optimizer_settings(theirs, model)

    assert cfg.train.max_iter == yacs.SOLVER.MAX_ITER
    # The lr multiplier of every iteration, as LRMultiplier evaluates it (at iter / max_iter).
    ours_lr = instantiate(cfg.lr_multiplier)
    theirs_lr = build_lr_scheduler(yacs, theirs)._multiplier
    fractions = [i / cfg.train.max_iter for i in range(cfg.train.max_iter)]
    assert [ours_lr(t) for t in fractions] == pytest.approx([theirs_lr(t) for t in fractions],
                                                            rel=1e-12)


def _augmentations(mapper):
    """Type and settings of each augmentation (a LazyConfig turns tuples into lists)."""
    return [(type(a).__name__, {k: list(v) if isinstance(v, tuple) else v
                                for k, v in vars(a).items()})
            for a in mapper.augmentations.augs]


@pytest.mark.parametrize("path", TRAINING)
def test_lazy_recipe_reads_data_and_runs_as_the_yacs_recipe(path):
    cfg, yacs = lazy(path), yacs_twin(path)
    train, test = cfg.dataloader.train, cfg.dataloader.test
    assert (train.dataset.names,) == yacs.DATASETS.TRAIN
    assert (test.dataset.names,) == yacs.DATASETS.TEST
    assert train.dataset.filter_empty == yacs.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert not test.dataset.filter_empty
    assert train.total_batch_size == yacs.SOLVER.IMS_PER_BATCH
    assert train.num_workers == test.num_workers == yacs.DATALOADER.NUM_WORKERS
    for mapper, is_train in [(train.mapper, True), (test.mapper, False)]:
        ours, theirs = instantiate(mapper), DatasetMapper(yacs, is_train=is_train)
        assert _augmentations(ours) == _augmentations(theirs)
        for attr in ("image_format", "use_instance_mask", "use_keypoint", "recompute_boxes"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert cfg.train.checkpointer.period == yacs.SOLVER.CHECKPOINT_PERIOD
    assert cfg.train.eval_period == yacs.TEST.EVAL_PERIOD
    assert cfg.train.amp.enabled == yacs.SOLVER.AMP.ENABLED
    assert cfg.train.seed == yacs.SEED
    assert cfg.train.init_checkpoint == yacs.MODEL.WEIGHTS


def test_cpu_recipe_runs_on_the_cpu_with_bf16_autocast():
    cfg = lazy(TRAINING[0])
    assert cfg.train.device == "cpu" and cfg.train.amp.enabled


def test_overrides_reach_the_config_and_typos_are_refused():
    path = os.path.join(REPO, TRAINING[0])
    cfg = load_lazy_config(path, ["train.max_iter=8", "model.num_classes=3",
                                  "+train.new_key=1"])
    assert (cfg.train.max_iter, cfg.model.head.num_classes, cfg.train.new_key) == (8, 3, 1)
    with pytest.raises(UserError, match="has no key train.max_iters .*\\+train.max_iters=8"):
        load_lazy_config(path, ["train.max_iters=8"])
    with pytest.raises(UserError, match="invalid override"):
        load_lazy_config(path, ["train.max_iter"])


@pytest.mark.parametrize("path, message", [
    ("configs/lazy/nope.py", "config file not found"),
    ("configs/Shapes/dsla_R_18_FPN_cpu.yaml", "yacs configs .* run with dsla-train"),
    ("configs/lazy/common/schedule.py", "defines no `model` and `train`"),
])
def test_bad_config_files_are_user_errors(path, message):
    with pytest.raises(UserError, match=message):
        load_lazy_config(os.path.join(REPO, path), [])
