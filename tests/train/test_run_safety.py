"""A run is never lost, misplaced or silently deleted: the output-dir lock, SIGTERM and a second
Ctrl-C, periodic (time-based) checkpoints and their rotation, stale temporaries of a killed write,
and set-up failures that leave no empty folder behind (issue #8, items 3-5, 7, 8, 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from solotune import cli
from solotune.errors import OutOfMemory, RunDirError, SolotuneError
from solotune.train import finetune
from solotune.train.interrupts import Terminated, deferred_signals
from solotune.train.run_dir import LOCK
from solotune.train.state import list_checkpoints

from train_fixtures import CtrlCAfter, WordTokenizer, tiny_config, tiny_model, write_records


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "records.json")


def _steps(out):
    return [s for s, _ in list_checkpoints(out)]


class SignalAfter:
    """Instrument that sends the process a real signal right after optimizer step ``n``."""

    def __init__(self, n: int, signum: int) -> None:
        self.n, self.signum = n, signum

    def after_step(self, model, optimizer, step):
        if step == self.n:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def python_sigint(monkeypatch):
    """Python's own Ctrl-C handler, whatever pytest was started with (a background job ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------- the lock
def test_a_second_process_cannot_train_into_a_locked_dir(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()} on testhost'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another solotune run \(pid {holder.pid} on testhost\)"):
            finetune(tiny_config(tmp_path, data, max_steps=1), model=tiny_model(), tokenizer=WordTokenizer())
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait()
    res = finetune(tiny_config(tmp_path, data, max_steps=1), model=tiny_model(), tokenizer=WordTokenizer())
    assert res.steps == 1


# ---------------------------------------------------------------------------- SIGTERM, Ctrl-C
def test_sigterm_saves_like_ctrl_c_and_resume_is_exact(tmp_path, data, capsys):
    cfg = tiny_config(tmp_path, data, max_steps=5, lora_dropout=0.1)
    straight = finetune(cfg.replace(output_dir=str(tmp_path / "straight")), model=tiny_model(),
                        tokenizer=WordTokenizer())
    with pytest.raises(Terminated):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=SignalAfter(2, signal.SIGTERM))
    assert "terminated (SIGTERM): saved a checkpoint of step 2" in capsys.readouterr().err
    assert _steps(tmp_path / "run") == [2]
    resumed = finetune(cfg.replace(resume=str(tmp_path / "run")), model=tiny_model(), tokenizer=WordTokenizer())
    assert resumed.losses == straight.losses


def test_sigterm_from_outside_saves_before_exiting(tmp_path, data):
    """A training process of its own, SIGTERM from outside (as a scheduler or ``docker stop`` sends it)."""
    child = (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from train_fixtures import WordTokenizer, tiny_config, tiny_model\n"
        "from pathlib import Path\n"
        "from solotune.train import finetune\n"
        "from solotune.train.interrupts import Terminated\n"
        "class Slow:\n"
        "    def after_step(self, model, optimizer, step):\n"
        "        print('step', step, flush=True); time.sleep(0.2)\n"
        f"cfg = tiny_config(Path({str(tmp_path)!r}), Path({str(data)!r}), max_steps=1000)\n"
        "try:\n"
        "    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=Slow())\n"
        "except Terminated:\n"
        "    sys.exit(143)\n")
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not p.stdout.readline().startswith("step"):
        pass
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM): saved a checkpoint" in err
    assert _steps(tmp_path / "run")


class InterruptDuringSave:
    """Ctrl-C after step 2, then ``extra`` more Ctrl-Cs while the exit checkpoint is being written."""

    def __init__(self, monkeypatch, extra: int) -> None:
        import solotune.train.state as state

        real = state.save_file

        def save_file(*a, **kw):
            for _ in range(extra):
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **kw)

        monkeypatch.setattr(state, "save_file", save_file)


@pytest.mark.parametrize("extra, saved", [(1, True), (2, False)])
def test_a_second_ctrl_c_while_saving(tmp_path, data, capsys, monkeypatch, python_sigint, extra, saved):
    cfg = tiny_config(tmp_path, data, max_steps=5)
    finetune(cfg.replace(max_steps=1, output_dir=str(tmp_path / "warm")), model=tiny_model(), tokenizer=WordTokenizer())
    InterruptDuringSave(monkeypatch, extra)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(2))
    err = capsys.readouterr().err
    assert "still saving the checkpoint" in err
    if saved:
        assert _steps(tmp_path / "run") == [2] and "saved a checkpoint of step 2" in err
    else:
        assert _steps(tmp_path / "run") == [] and "was NOT saved" in err and "no checkpoint of this run" in err
    # nothing half-written either way
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and no KeyboardInterrupt was raised
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------ periodic checkpoints, rotation
def test_time_based_checkpoints_and_rotation(tmp_path, data):
    # Every step is "10 minutes later" with a tiny interval; keep the newest 2.
    cfg = tiny_config(tmp_path, data, max_steps=5, save_every_minutes=1e-9, keep_checkpoints=2)
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    assert _steps(tmp_path / "run") == [4, 5]
    # Off: only the final checkpoint; keep 0 = keep all.
    finetune(cfg.replace(output_dir=str(tmp_path / "off"), save_every_minutes=0), model=tiny_model(),
             tokenizer=WordTokenizer())
    assert _steps(tmp_path / "off") == [5]
    finetune(cfg.replace(output_dir=str(tmp_path / "all"), keep_checkpoints=0, save_every=1, save_every_minutes=0),
             model=tiny_model(), tokenizer=WordTokenizer())
    assert _steps(tmp_path / "all") == [1, 2, 3, 4, 5]


def test_rotation_never_deletes_a_later_branch(tmp_path, data):
    """Resuming from an older checkpoint of the same dir: the newer ones stay (they are not this branch's)."""
    cfg = tiny_config(tmp_path, data, max_steps=6, save_every=2, keep_checkpoints=0, save_every_minutes=0)
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    assert _steps(tmp_path / "run") == [2, 4, 6]
    older = tmp_path / "run" / "checkpoints" / "step-000002"
    finetune(cfg.replace(resume=str(older), max_steps=6, keep_checkpoints=1, save_every=1),
             model=tiny_model(), tokenizer=WordTokenizer())
    assert _steps(tmp_path / "run") == [6]  # its own 3, 4, 5 rotated away; 6 rewritten by this branch


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=3)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(2))
    stale = [tmp_path / "run" / "checkpoints" / ".step-000003.tmp-abc123", tmp_path / "run" / ".final.tmp-x1"]
    for p in stale:
        p.mkdir()
        (p / "weights.safetensors").write_bytes(b"half")
    finetune(cfg.replace(resume=str(tmp_path / "run")), model=tiny_model(), tokenizer=WordTokenizer())
    assert not any(p.exists() for p in stale)


# -------------------------------------------------------------------------- output-dir problems
def test_a_used_output_dir_is_refused_without_deleting_anything(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=1, save=False)  # metrics and summary only, no checkpoint
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_set_up_errors_leave_no_empty_output_dir(tmp_path, data):
    out = tmp_path / "new" / "run"
    # Bad data is found before the folder is made; a missing model only after it was claimed.
    with pytest.raises(SolotuneError, match="no such file"):
        finetune(tiny_config(tmp_path, tmp_path / "missing.json", output_dir=str(out)), model=tiny_model(),
                 tokenizer=WordTokenizer())
    assert not out.exists()
    with pytest.raises(SolotuneError, match="no such checkpoint"):
        finetune(tiny_config(tmp_path, data, output_dir=str(out), model=str(tmp_path / "no-model")))
    assert not out.exists()


@pytest.mark.parametrize("case", ["output-dir-is-a-file", "resume-a-file", "already-holds-a-run"])
def test_cli_run_dir_problems_are_one_line(tmp_path, capsys, case):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    argv = {"output-dir-is-a-file": ["finetune", "--output-dir", str(f)],
            "resume-a-file": ["finetune", "--resume", str(f)],
            "already-holds-a-run": ["finetune", "--profile", "course", "--output-dir", str(run)]}[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f.read_text() == "mine" and (run / "summary.json").is_file()


# --------------------------------------------------------------------------------- out of memory
class OomAt:
    """``train_step`` as the loop calls it, raising the CUDA allocator's error on its ``n``-th call."""

    def __init__(self, real, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total "
                                         "capacity of 23.64 GiB of which 1.02 GiB is free.\nmore details")
        return self.real(*args, **kwargs)


def test_out_of_memory_ends_the_run_keeping_the_last_checkpoint(tmp_path, data, monkeypatch):
    """An OOM in step 3 of a run that checkpoints every step: one error naming the step, the allocator's first
    line and the checkpoint of step 2, nothing saved after it, and resuming from it gives the uninterrupted curve."""
    from solotune.train import loop

    cfg = tiny_config(tmp_path, data, max_steps=4, save_every=1)
    straight = finetune(cfg.replace(output_dir=str(tmp_path / "straight")), model=tiny_model(),
                        tokenizer=WordTokenizer())
    monkeypatch.setattr(loop, "train_step", OomAt(loop.train_step, 3))
    with pytest.raises(OutOfMemory) as err:
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    msg = str(err.value)
    assert "\n" not in msg and "optimizer step 3" in msg and "Tried to allocate 1.50 GiB" in msg, msg
    assert "step-000002" in msg and "solotune plan" in msg and "--resume" in msg, msg
    assert max(_steps(tmp_path / "run")) == 2 and not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.undo()
    resumed = finetune(cfg.replace(resume=str(tmp_path / "run")), model=tiny_model(), tokenizer=WordTokenizer())
    assert resumed.losses == straight.losses


def test_cli_out_of_memory_is_one_line(tmp_path, data, capsys, monkeypatch):
    from cli_fixtures import common_flags, write_tiny_base

    from solotune.train import loop

    base = write_tiny_base(tmp_path / "hf")
    monkeypatch.setattr(loop, "train_step", OomAt(loop.train_step, 1))
    argv = ["finetune", *common_flags(base, data, tmp_path / "run"), "--max-steps", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "out of memory in optimizer step 1" in err and "no checkpoint was written" in err, err


def test_host_memory_running_out_names_the_host(tmp_path, data, monkeypatch):
    """With --offload activations, pinning failing (page-locked RAM exhausted) ends the run with the same
    one line, naming the host's memory and the plan option that checks it (not the GPU's remedies)."""
    import functools

    import solotune.train.offload as offload_mod
    from solotune.train import loop

    def fail(nbytes, pin):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(offload_mod, "_host_empty", fail)
    # the tiny model's activations are below the default min_bytes: offload every one of them
    monkeypatch.setattr(loop, "offload_context", functools.partial(offload_mod.offload_context, min_bytes=1))
    cfg = tiny_config(tmp_path, data, max_steps=2, offload="activations", grad_checkpoint="all")
    with pytest.raises(OutOfMemory) as err:
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    msg = str(err.value)
    assert "\n" not in msg and "optimizer step 1 (pinned host memory: could not lock" in msg, msg
    assert "--host-mem" in msg and "--quantize nf4" not in msg, msg
