"""The baselines are siblings of DSLA with their own config nodes, every setting is written once
(dsla.config's tables give the config keys, the constructors' defaults and the LazyConfig model),
and the shapes splits' files name their style with fixed identifiers."""
import inspect
import json
import os

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling import build_model

from conftest import REPO, tiny_cfg
from dsla import config as dsla_config
from dsla.baselines import FCOSDetectron2, FCOSPlain
from dsla.config import DETECTORS, GENERAL_DEFAULTS, add_dsla_config, defaults, head_config_node
from dsla.data import SHAPES_SPLITS, STYLES, generate_shapes_dataset
from dsla.errors import UserError
from dsla.head import DSLAHead
from dsla.meta_arch import DSLA
from dsla.point_detector import PointDetector

SHAPES = os.path.join(REPO, "configs", "Shapes")
PLAIN = os.path.join(SHAPES, "fcos_plain_R_18_FPN_cpu.yaml")


def _build(config_file, *opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts, config_file=config_file))


@pytest.mark.parametrize("cls", [FCOSPlain, FCOSDetectron2])
def test_baselines_are_not_dsla(cls):
    assert not issubclass(cls, DSLA)


def test_plain_fcos_reads_its_own_node_not_dsla():
    model = _build(PLAIN, "MODEL.DSLA.NUM_CLASSES", 7, "MODEL.DSLA.CLS_LOSS_WEIGHT", 5.0,
                   "MODEL.DSLA.NMS_THRESH_TEST", 0.1, "MODEL.DSLA.NUM_CONVS", 3)
    assert (model.num_classes, model.cls_loss_weight, model.test_nms_thresh) == (4, 1.0, 0.6)
    assert len(model.head.cls_convs) == 2
    model = _build(PLAIN, "MODEL.FCOS_PLAIN.NUM_CLASSES", 7, "MODEL.FCOS_PLAIN.FOCAL_LOSS_GAMMA",
                   1.5, "MODEL.FCOS_PLAIN.NMS_THRESH_TEST", 0.1, "MODEL.FCOS_PLAIN.NUM_CONVS", 3)
    assert (model.num_classes, model.focal_loss_gamma, model.test_nms_thresh) == (7, 1.5, 0.1)
    assert len(model.head.cls_convs) == 3 and model.head.cls_score.out_channels == 7


def test_plain_fcos_errors_name_its_keys_and_arguments():
    with pytest.raises(UserError, match=r"^Invalid MODEL.FCOS_PLAIN.BOX_LOSS_TYPE = 'l1'"):
        _build(PLAIN, "MODEL.FCOS_PLAIN.BOX_LOSS_TYPE", "l1")
    kwargs = FCOSPlain.from_config(tiny_cfg(config_file=PLAIN))
    kwargs["test_nms_thresh"] = 2.0
    with pytest.raises(UserError, match="Invalid FCOSPlain argument test_nms_thresh = 2.0"):
        FCOSPlain(**kwargs)


@pytest.mark.parametrize("arch", sorted(DETECTORS))
def test_each_meta_architecture_has_its_node(arch):
    cfg = tiny_cfg("MODEL.META_ARCHITECTURE", arch)
    name, node = head_config_node(cfg)
    assert name == f"MODEL.{DETECTORS[arch][0]}" and node is cfg.MODEL[DETECTORS[arch][0]]
    assert type(build_model(cfg)).__name__ == arch


def test_nodes_hold_exactly_the_settings_of_their_tables():
    cfg = get_cfg()
    add_dsla_config(cfg)
    for node, settings, head_settings in DETECTORS.values():
        table = {s.key: s.default for s in settings + head_settings}
        assert dict(cfg.MODEL[node]) == table, node


@pytest.mark.parametrize("cls, table", [(DSLA, dsla_config.DSLA_SETTINGS),
                                        (FCOSPlain, dsla_config.FCOS_PLAIN_SETTINGS),
                                        (DSLAHead, dsla_config.DSLA_HEAD_SETTINGS)])
def test_constructor_defaults_are_the_config_defaults(cls, table):
    # The arguments of the class and of the bases it passes ``kwargs`` on to.
    params = {}
    for c in reversed([c for c in cls.__mro__ if c in (cls, PointDetector)]):
        params.update(inspect.signature(c.__init__).parameters)
    expected = {**defaults(table), **GENERAL_DEFAULTS}
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty and name in expected:
            assert p.default == expected[name], name
    # Every optional argument of the table is optional in the constructor with that default.
    optional = {n for n, p in params.items() if p.default is not inspect.Parameter.empty}
    required = {"head_in_features", "num_classes", "regress_ranges"}
    assert set(defaults(table)) - required <= optional


def test_lazy_model_takes_the_config_defaults():
    model = LazyConfig.load(os.path.join(REPO, "configs", "lazy", "common", "models.py")).model
    for arg, value in {**defaults(dsla_config.DSLA_SETTINGS), **GENERAL_DEFAULTS}.items():
        # The authors' R-50 1x run weighted the classification loss by 2.
        expected = 2.0 if arg == "cls_loss_weight" else value
        assert model[arg] == expected, arg
    for arg, value in defaults(dsla_config.DSLA_HEAD_SETTINGS).items():
        assert model.head[arg] == value, arg


def test_split_files_name_their_style_with_fixed_identifiers(tmp_path):
    """The published splits' annotations.json say "demo" for the standard style: a split on disk
    stays valid (and byte-identical when regenerated) whatever the style is called in code."""
    assert SHAPES_SPLITS["shapes_train"]["style"] == "standard"
    assert set(STYLES) == {"easy", "standard", "crowded"}
    for style, file_id in [("standard", "demo"), ("easy", "easy"), ("crowded", "crowded")]:
        json_file, _ = generate_shapes_dataset(str(tmp_path), style, num_images=1, seed=0,
                                               image_size=64, style=style)
        with open(json_file) as f:
            assert json.load(f)["info"]["dsla_shapes"]["style"] == file_id
