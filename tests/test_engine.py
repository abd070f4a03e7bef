"""dsla.engine's optimizer: SGD / AdamW with detectron2's gradient clipping hooks, including the
authors' whole-model clipping (``CLIP_TYPE: "full_model"``); what each launched rank runs."""
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing import ProcessRaisedException

from conftest import tiny_cfg
from dsla import engine
from dsla.cli import RANK_USER_ERROR, exit_on_user_error, mark_rank_user_error
from dsla.engine import Trainer, run_then_leave_group
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
    """Whether the group was still initialised at each barrier ``dsla.engine`` called."""
    calls = []
    monkeypatch.setattr(engine.comm, "synchronize", lambda: calls.append(dist.is_initialized()))
    return calls


def test_a_rank_that_finished_waits_for_the_others_then_leaves(gloo_group, barriers):
    # Left to interpreter shutdown, gloo threads can abort the rank (engine.leave_process_group).
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


@pytest.mark.parametrize("world_size, traceback_env, marked", [
    (2, None, True), (2, "1", False), (1, None, False)])
def test_a_launched_ranks_user_error_is_marked_for_the_parent(monkeypatch, world_size,
                                                               traceback_env, marked):
    monkeypatch.setattr(engine.comm, "get_world_size", lambda: world_size)
    monkeypatch.delenv("DSLA_TRACEBACK", raising=False)
    if traceback_env:
        monkeypatch.setenv("DSLA_TRACEBACK", traceback_env)
    with pytest.raises(UserError) as info:
        run_then_leave_group(_user_error, None)
    expected = RANK_USER_ERROR + "MODEL.X is bad" if marked else "MODEL.X is\n  bad"
    assert str(info.value) == expected


def _rank_failure(error):
    """What ``launch``'s parent gets when a rank raised ``error``: its traceback text."""
    try:
        raise error
    except Exception:
        return ProcessRaisedException(traceback.format_exc(), error_index=1, error_pid=123)


def test_parent_ends_a_ranks_user_error_in_one_line(monkeypatch):
    monkeypatch.delenv("DSLA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info, exit_on_user_error():
        raise _rank_failure(mark_rank_user_error(UserError("OUTPUT_DIR /x holds a run")))
    assert info.value.code == "error: OUTPUT_DIR /x holds a run"


@pytest.mark.parametrize("error", [
    RuntimeError("a bug"),
    RuntimeError(f"a bug quoting dsla.errors.UserError: {RANK_USER_ERROR}x"),
    UserError("raised in a rank but not marked"),
])
def test_parent_keeps_the_traceback_of_anything_else(monkeypatch, error):
    monkeypatch.delenv("DSLA_TRACEBACK", raising=False)
    with pytest.raises(ProcessRaisedException), exit_on_user_error():
        raise _rank_failure(error)
