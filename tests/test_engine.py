"""dsla.engine's optimizer: SGD / AdamW with detectron2's per-parameter gradient clipping and the
authors' whole-model clipping (``CLIP_TYPE: "full_model"``); what each launched rank runs and how
its user error reaches the parent; and the detectron2 behaviours the Trainer's overrides stand on
(each test there goes red when detectron2 changes under them)."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing import ProcessRaisedException

import detectron2.engine.defaults as d2_defaults
from detectron2.data import DatasetCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks

from conftest import tiny_cfg
from dsla import cli, engine
from dsla.checkpoint import DSLACheckpointer
from dsla.cli import RANK_ERRORS_ENV, exit_on_user_error, run_then_leave_group
from dsla.cpu_amp import CPUAutocast
from dsla.data import register_coco_dataset
from dsla.engine import Trainer
from dsla.errors import UserError


def _step_with_grads(clip_type, optimizer="SGD"):
    """One optimizer step of two 4-element parameters whose gradients are all 1 (norm 2 each,
    norm 2·sqrt(2) together), lr 1, no momentum or weight decay; returns the update norms."""
    cfg = tiny_cfg("SOLVER.OPTIMIZER", optimizer, "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0",
                   "SOLVER.WEIGHT_DECAY", "0.0", "SOLVER.WEIGHT_DECAY_NORM", "0.0",
                   "SOLVER.BIAS_LR_FACTOR", "1.0", "SOLVER.WEIGHT_DECAY_BIAS", "0.0",
                   "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                   "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
                   "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
                   "SOLVER.CLIP_GRADIENTS.NORM_TYPE", "2.0")
    model = nn.ParameterList([nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))])
    opt = Trainer.build_optimizer(cfg, model)
    for p in model:
        p.grad = torch.ones(4)
    opt.step()
    return [float(p.detach().norm()) for p in model]


def test_full_model_clipping_clips_the_norm_of_all_gradients_together():
    norms = _step_with_grads("full_model")
    assert sum(n ** 2 for n in norms) ** 0.5 == pytest.approx(1.0, rel=1e-4)
    assert norms[0] == pytest.approx(2 ** -0.5, rel=1e-4)


def test_norm_clipping_stays_per_parameter():
    assert _step_with_grads("norm") == pytest.approx([1.0, 1.0], rel=1e-4)


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="SOLVER.OPTIMIZER"):
        Trainer.build_optimizer(tiny_cfg("SOLVER.OPTIMIZER", "LAMB"), nn.Linear(2, 2))


@pytest.fixture
def gloo_group(tmp_path):
    """A one-rank gloo process group, as ``launch`` makes per rank; destroyed if a test left it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            world_size=1, rank=0)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def barriers(monkeypatch):
    """Whether the group was still initialised at each barrier ``dsla.cli`` called."""
    calls = []
    monkeypatch.setattr(cli.comm, "synchronize", lambda: calls.append(dist.is_initialized()))
    return calls


def test_a_rank_that_finished_waits_for_the_others_then_leaves(gloo_group, barriers):
    # Left to interpreter shutdown, gloo threads can abort the rank (cli.leave_process_group).
    assert run_then_leave_group(lambda args: args * 2, 21) == 42
    assert barriers == [True]
    assert not dist.is_initialized()


@pytest.mark.parametrize("error", [RuntimeError("boom"), UserError("boom")])
def test_a_rank_that_failed_neither_waits_nor_leaves(gloo_group, barriers, error):
    # A barrier after a failure would wait for ranks stuck in collectives with the failed one.
    def fail(args):
        raise error

    with pytest.raises(type(error), match="boom"):
        run_then_leave_group(fail, None)
    assert barriers == []
    assert dist.is_initialized()


def _user_error(args):
    raise UserError("MODEL.X is\n  bad")


@pytest.mark.parametrize("world_size, recorded", [(2, True), (1, False)])
def test_a_launched_ranks_user_error_is_left_for_the_parent(monkeypatch, tmp_path, world_size,
                                                             recorded):
    monkeypatch.setattr(cli.comm, "get_world_size", lambda: world_size)
    monkeypatch.setattr(cli.comm, "get_local_rank", lambda: 1)
    monkeypatch.setenv(RANK_ERRORS_ENV, str(tmp_path))
    with pytest.raises(UserError, match="MODEL.X is\n  bad"):
        run_then_leave_group(_user_error, None)
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert files == ({"rank1.txt": "MODEL.X is bad"} if recorded else {})


def _rank_failure(error_index=1):
    """What ``launch``'s parent gets when rank ``error_index`` failed: its traceback text."""
    return ProcessRaisedException("Traceback ...", error_index=error_index, error_pid=123)


def test_parent_ends_a_ranks_user_error_in_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("DSLA_TRACEBACK", raising=False)
    (tmp_path / "rank1.txt").write_text("OUTPUT_DIR /x holds a run")
    with pytest.raises(SystemExit) as info, exit_on_user_error(rank_errors=str(tmp_path)):
        raise _rank_failure()
    assert info.value.code == "error: OUTPUT_DIR /x holds a run"


@pytest.mark.parametrize("failed_rank, traceback_env", [(0, None), (1, "1")])
def test_parent_keeps_the_traceback_of_anything_else(monkeypatch, tmp_path, failed_rank,
                                                      traceback_env):
    """A rank that failed without a user error (rank 0 here), or DSLA_TRACEBACK set."""
    monkeypatch.delenv("DSLA_TRACEBACK", raising=False)
    if traceback_env:
        monkeypatch.setenv("DSLA_TRACEBACK", traceback_env)
    (tmp_path / "rank1.txt").write_text("a user error in rank 1")
    with pytest.raises(ProcessRaisedException), exit_on_user_error(rank_errors=str(tmp_path)):
        raise _rank_failure(failed_rank)


# The detectron2 behaviours under the Trainer's overrides.


@pytest.fixture(scope="module")
def tiny_training_cfg(tiny_shapes, tmp_path_factory):
    """The tiny config on the 12-image training split, batch 2, no loader workers."""
    name, json_file, image_root = tiny_shapes[1:4]
    out = tmp_path_factory.mktemp("engine")
    if "engine_tiny_train" not in DatasetCatalog.list():
        register_coco_dataset("engine_tiny_train", json_file, image_root)
    return lambda *opts: tiny_cfg("DATASETS.TRAIN", "('engine_tiny_train',)", "DATASETS.TEST",
                                  "()", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS",
                                  "0", "OUTPUT_DIR", str(out), *opts)


def test_detectron2_still_pins_a_gpu_for_ddp(monkeypatch):
    """Why ``cpu_ddp_model`` exists: ``create_ddp_model`` passes device_ids=[local rank], which
    DDP refuses for a CPU model. Red here: detectron2 no longer does, drop the override."""
    calls = []
    monkeypatch.setattr(d2_defaults.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(d2_defaults, "DistributedDataParallel",
                        lambda model, **kwargs: calls.append(kwargs))
    d2_defaults.create_ddp_model(nn.Linear(2, 2), broadcast_buffers=False)
    assert calls and calls[0]["device_ids"] is not None


def test_trainer_builds_ddp_through_cpu_ddp_model(monkeypatch, tiny_training_cfg):
    """``DefaultTrainer.__init__`` still makes its DDP model through the module-level name
    ``detectron2.engine.defaults.create_ddp_model`` that the Trainer replaces meanwhile."""
    calls = []
    monkeypatch.setattr(engine, "create_ddp_model",
                        lambda model, **kwargs: calls.append(kwargs) or model)
    Trainer(tiny_training_cfg())
    assert calls == [{"broadcast_buffers": False, "device_ids": None}]
    assert d2_defaults.create_ddp_model is not engine.cpu_ddp_model  # restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU")
def test_detectron2s_amp_trainer_still_needs_cuda():
    """Why a CPU trains in bfloat16 through dsla.cpu_amp. Red here: AMPTrainer runs on a CPU."""
    model = nn.Linear(2, 2)
    with pytest.warns(UserWarning):  # its GradScaler, disabled without CUDA
        step = AMPTrainer(model, [None], torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(AssertionError, match="CUDA"):
        step.run_step()


def test_trainer_steps_and_checkpoints_through_the_overrides(tiny_training_cfg):
    """CPU AMP: detectron2's SimpleTrainer over CPUAutocast; the hooks that DefaultTrainer
    builds save through DSLACheckpointer (built in ``build_hooks``, before them)."""
    trainer = Trainer(tiny_training_cfg("SOLVER.AMP.ENABLED", "True"))
    assert type(trainer._trainer) is SimpleTrainer and isinstance(trainer.model, CPUAutocast)
    savers = [h.checkpointer for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert savers == [trainer.checkpointer] and isinstance(savers[0], DSLACheckpointer)
