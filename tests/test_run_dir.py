"""The run's folder: one run per OUTPUT_DIR (a lock naming the process that holds it), a refused
run writes nothing, ``--eval-only`` never replaces the training run's files, config mistakes end
in one line, and the terminal log is short and free of colour escapes when redirected."""
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import CPU_CONFIG, REPO
from dsla.cli import load_config
from dsla.engine import argument_parser, setup
from dsla.errors import UserError
from dsla.lazy_engine import load_lazy_config
from test_lazy_train import LAZY_CONFIG, TINY
from test_user_errors import dsla_warnings  # noqa: F401 (fixture)
from test_workflow import run, train_args, trained  # noqa: F401 (fixture)

ESCAPE = "\x1b["
LOCK_FILE = ".dsla.lock"


def _snapshot(folder):
    """Every file under ``folder`` with its content's digest and mtime."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (hashlib.sha1(f.read()).hexdigest(),
                                                        os.stat(path).st_mtime_ns)
    return files


def _last_line(proc):
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/out`` as a run would; killed at the end."""
    out = tmp_path / "out"
    code = ("import sys, time; from dsla.run_dir import lock_run_folder; "
            "lock_run_folder(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc.pid
    proc.kill()
    proc.wait()


# One run per OUTPUT_DIR.


def test_training_into_a_folder_in_use_stops_naming_the_process(tiny_shapes, holder):
    out, pid = holder
    before = _snapshot(out)
    last = _last_line(run(train_args(tiny_shapes, out, "SOLVER.MAX_ITER", "2")))
    assert last.startswith(f"error: OUTPUT_DIR {out} is in use by another run (pid {pid} "), last
    assert _snapshot(out) == before


def test_two_processes_into_a_folder_in_use_stop_in_one_line(tiny_shapes, holder):
    out, pid = holder
    last = _last_line(run(["--num-gpus", "2", *train_args(tiny_shapes, out)]))
    assert f"is in use by another run (pid {pid} " in last, last
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # no rank wrote a log there


def test_lazy_training_into_a_folder_in_use_stops(tiny_shapes, holder):
    out, pid = holder
    proc = subprocess.run(
        [sys.executable, "-m", "dsla.lazy_engine", "--config-file", LAZY_CONFIG, *tiny_shapes,
         *TINY, "train.max_iter=2", f"train.output_dir={out}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert f"is in use by another run (pid {pid} " in _last_line(proc)


def test_a_finished_run_leaves_no_lock(trained):
    out, _ = trained
    assert not (out / LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, dsla_warnings):
    from dsla.run_dir import RunLock

    (tmp_path / LOCK_FILE).write_text("4194304 otherhost\n")  # no process holds it
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert any("process 4194304 on otherhost" in m and "taking the folder over" in m
               for m in dsla_warnings), dsla_warnings
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# A refused run writes nothing; --eval-only keeps the training run's files.


def test_refused_training_writes_nothing(tiny_shapes, trained):
    out, _ = trained
    before = _snapshot(out)
    last = _last_line(run(train_args(tiny_shapes, out, "SOLVER.MAX_ITER", "2")))
    assert "already holds a training run" in last, last
    assert _snapshot(out) == before


def test_eval_only_writes_into_its_own_folder(tiny_shapes, trained):
    out, _ = trained
    before = _snapshot(out)
    proc = run(["--eval-only", *train_args(tiny_shapes, out),
                "MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {"eval/config.yaml", "eval/log.txt", "eval/eval_results.json"} <= set(after)


# Config mistakes: one line naming the key or the files.


def _setup_error(tmp_path, *argv):
    args = argument_parser().parse_args(["--config-file", CPU_CONFIG, *argv,
                                         "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(UserError) as e:
        setup(args)
    assert not (tmp_path / "out").exists()
    return str(e.value)


@pytest.mark.parametrize("opts, key", [
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH = 0"),
    (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "ranges"], "INPUT.MIN_SIZE_TRAIN_SAMPLING = 'ranges'"),
    (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "INPUT.MIN_SIZE_TRAIN", "(128,)"],
     "INPUT.MIN_SIZE_TRAIN = (128,)"),
])
def test_values_detectron2_asserts_on_name_the_key(tmp_path, opts, key):
    assert key in _setup_error(tmp_path, *opts)


def test_missing_base_names_both_files(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("_BASE_: ../Base-missing.yaml\n")
    with pytest.raises(UserError) as e:
        load_config(str(config), [])
    missing = os.path.join(str(tmp_path), "../Base-missing.yaml")
    assert f"config file not found: {missing} (the _BASE_ of {config})" == str(e.value)


def test_an_option_after_the_overrides_says_options_go_first(tmp_path):
    message = _setup_error(tmp_path, "MODEL.WEIGHTS", "x.pth", "--eval-only")
    assert message.startswith("--eval-only comes after the config overrides (after "
                              "'MODEL.WEIGHTS x.pth')"), message
    assert "options go before the overrides" in message
    with pytest.raises(UserError, match="options go before the overrides"):
        load_lazy_config(LAZY_CONFIG, ["train.max_iter=2", "--resume"])


def test_unquoted_on_off_in_yaml_says_to_quote_them(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(textwrap.dedent(f"""\
        _BASE_: {CPU_CONFIG}
        MODEL:
          DSLA:
            IOU_COUPLING: off
        """))
    with pytest.raises(UserError) as e:
        load_config(str(config), [])
    message = str(e.value)
    assert "type mismatch for MODEL.DSLA.IOU_COUPLING" in message, message
    assert 'quote the value, e.g. IOU_COUPLING: "off"' in message, message
    config.write_text(config.read_text().replace("off", '"off"'))
    assert load_config(str(config), []).MODEL.DSLA.IOU_COUPLING == "off"


# The log: readable when redirected; the long dumps in log.txt.


def test_redirected_log_is_plain_and_short(trained):
    out, proc = trained
    terminal, log = proc.stdout + proc.stderr, (out / "log.txt").read_text()
    assert ESCAPE not in terminal and ESCAPE not in log
    for dump in ("IOU_COUPLING:", "Environment info:", "(backbone): "):
        assert dump in log and dump not in terminal, dump
    assert f"Full config saved to {out / 'config.yaml'}" in terminal
    assert "eta:" in log and any(f.startswith("events.out.tfevents") for f in os.listdir(out))
