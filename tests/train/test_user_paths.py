"""What a user meets at the command line (issue 8): a resumed run continues where it lives, a run is
never silently replaced, a user's own small file trains, an empty answer is a valid record, and
every mistake the user can fix is one line on stderr with exit status 2 (a bug keeps its traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from solotune import cli
from solotune.errors import ConfigError
from solotune.train import TrainConfig

from cli_fixtures import base, common_flags, data  # noqa: F401  (module fixtures)
from train_fixtures import write_records


def one_error_line(capsys, command: str) -> str:
    """The only stderr line, checked to be ``solotune COMMAND: error: ...`` without a traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"solotune {command}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ item 1: --resume continues in DIR
def _interrupted_run(base: Path, data: Path, where: Path, monkeypatch) -> Path:
    """A run started in ``where`` with a *relative* --output-dir, cut back to its step-3 checkpoint
    (as if stopped there: no step 6, no final/, no summary)."""
    where.mkdir()
    monkeypatch.chdir(where)
    assert cli.main(["finetune", *common_flags(base, data, "run"), "--max-steps", "6", "--save-every", "3"]) == 0
    run = where / "run"
    shutil.rmtree(run / "checkpoints" / "step-000006")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    return run


def test_resume_continues_in_the_resumed_dir_from_anywhere(base, data, tmp_path, monkeypatch):
    run = _interrupted_run(base, data, tmp_path / "a", monkeypatch)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert cli.main(["finetune", "--resume", str(copy)]) == 0  # a copied run dir continues in the copy
    assert (copy / "final").is_dir() and (copy / "checkpoints" / "step-000006").is_dir()
    assert not (run / "final").exists() and not (run / "summary.json").exists()  # the original is untouched
    assert list(elsewhere.iterdir()) == []

    assert cli.main(["finetune", "--resume", str(run / "checkpoints" / "step-000003")]) == 0  # a checkpoint folder
    assert (run / "final").is_dir() and (run / "checkpoints" / "step-000006").is_dir()
    assert list(elsewhere.iterdir()) == []
    done = [json.loads((d / "summary.json").read_text()) for d in (run, copy)]
    assert done[0]["steps"] == done[1]["steps"] == 6 and done[0]["val_loss"] == done[1]["val_loss"]
    assert done[0]["config"]["output_dir"] == str(run.resolve())


# ------------------------------------------------------------ item 2: a run is never silently replaced
def test_the_default_output_dir_moves_on_instead_of_deleting_a_run(base, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = [*common_flags(base, data), "--max-steps", "1"]  # no --output-dir: the profile's runs/quickstart
    assert cli.main(["finetune", *flags]) == 0
    first = (tmp_path / "runs" / "quickstart" / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["finetune", *flags]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "runs" / "quickstart-2" / "summary.json").is_file()
    assert (tmp_path / "runs" / "quickstart" / "summary.json").read_bytes() == first
    said = [line for line in out.splitlines() if "earlier run" in line]
    assert len(said) == 1 and "runs/quickstart-2" in said[0]
    assert cli.main(["finetune", *flags]) == 0
    assert (tmp_path / "runs" / "quickstart-3" / "summary.json").is_file()


def test_a_named_output_dir_holding_a_run_is_refused_in_one_line(base, data, tmp_path, capsys):
    flags = [*common_flags(base, data, tmp_path / "x"), "--max-steps", "1"]
    assert cli.main(["finetune", *flags]) == 0
    before = (tmp_path / "x" / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["finetune", *flags]) == 2
    line = one_error_line(capsys, "finetune")
    assert "--resume" in line and "--overwrite" in line
    assert (tmp_path / "x" / "summary.json").read_bytes() == before


# ---------------------------------------------------------------- item 7: a user's own (small) file
@pytest.mark.parametrize("n, n_val", [(10, 1), (40, 2)])
def test_own_file_without_ranges_holds_out_its_last_5_percent(base, tmp_path, capsys, n, n_val):
    data = write_records(tmp_path / "mine.json", n=n)
    assert cli.main(["finetune", *common_flags(base, data, tmp_path / "run", ranges=False), "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"train: records 0:{n - n_val} " in out and f"val:   records {n - n_val}:{n} " in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] is not None


def test_a_range_outside_the_data_names_the_flags_and_the_count(base, tmp_path, capsys):
    data = write_records(tmp_path / "mine.json", n=10)
    assert cli.main(["finetune", *common_flags(base, data, tmp_path / "run", ranges=False),
                     "--train-range", "0:200"]) == 2
    line = one_error_line(capsys, "finetune")
    assert "--train-range" in line and "--val-range" in line and "10 records" in line
    assert not (tmp_path / "run").exists()


def test_data_is_checked_before_the_model_is_loaded(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x", "output": 3}]))
    flags = ["--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "bad.json"),
             "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert cli.main(["finetune", *flags]) == 2
    line = one_error_line(capsys, "finetune")
    assert "bad.json: record 0" in line and "'output' must be a string" in line  # not the missing model
    assert not (tmp_path / "run").exists()


def test_resumed_old_config_with_explicit_ranges_still_loads():
    old = TrainConfig().to_dict() | {"train_range": [0, 200], "val_range": [400, 500]}
    cfg = TrainConfig.from_dict(old)
    assert cfg.train_range == (0, 200) and cfg.val_range == (400, 500)
    assert TrainConfig().train_range is None and TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


# ------------------------------------------------------------------- item 6: an empty output trains EOS
def test_an_empty_output_is_trained_not_an_error(base, tmp_path, capsys):
    data = write_records(tmp_path / "mine.json", n=48)
    rows = json.loads(data.read_text())
    rows[3]["output"] = ""  # as record 284 of the real Stanford Alpaca file
    data.write_text(json.dumps(rows))
    assert cli.main(["finetune", *common_flags(base, data, tmp_path / "run"), "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert sum("empty output" in line for line in out.splitlines()) == 1 and "bad record" not in out


def test_the_bundled_sample_reports_no_bad_record(base, tmp_path, capsys):
    flags = [*common_flags(base, "alpaca-sample", tmp_path / "run", ranges=False), "--max-steps", "1",
             "--max-samples", "4", "--val-samples", "2"]
    assert cli.main(["finetune", *flags]) == 0
    out = capsys.readouterr().out
    assert "bad record" not in out and "empty output" not in out  # record 284 is valid, and outside 0:200 / 400:500
    assert "train: records 0:4 " in out and "val:   records 400:402 " in out


# ------------------------------------------------------------------ item 8: one line, or a traceback
@pytest.mark.parametrize("argv, culprit", [
    (["finetune", "--lora-targets", "wq,qkv"], "lora_targets"),
    (["finetune", "--config", "{tmp}/missing.json"], "missing.json"),
    (["finetune", "--resume", "{tmp}/file.txt"], "file.txt: is a file"),
    (["finetune", "--resume", "{tmp}/no-such-run"], "no-such-run"),
    (["finetune", "--resume", "{tmp}"], "checkpoints"),
    (["finetune", "--device", "gpu"], "--device gpu"),
    (["generate", "--model", "{tmp}/no-such-model", "--prompt", "hi"], "no-such-model"),
    (["eval", "--adapter", "{tmp}/no-such-adapter"], "no-such-adapter"),
], ids=["bad-setting", "missing-config", "resume-a-file", "resume-missing", "resume-no-checkpoints",
        "unknown-device", "missing-model", "missing-adapter"])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    assert culprit in one_error_line(capsys, argv[0])


@pytest.mark.parametrize("command", [["finetune"], ["generate", "--prompt", "hi"], ["eval"]])
@pytest.mark.parametrize("device, gpus", [("cuda", 0), ("cuda:3", 1)])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, monkeypatch, command, device, gpus):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert cli.main([*command, "--device", device]) == 2
    assert f"--device {device}" in one_error_line(capsys, command[0])


def test_an_output_dir_that_is_a_file_is_one_line(base, data, tmp_path, capsys):
    (tmp_path / "taken").write_text("my notes")
    assert cli.main(["finetune", *common_flags(base, data, tmp_path / "taken"), "--max-steps", "1"]) == 2
    assert "taken" in one_error_line(capsys, "finetune")
    assert (tmp_path / "taken").read_text() == "my notes"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), FileNotFoundError("a bug")])
def test_a_bug_keeps_its_traceback(monkeypatch, exc):
    def broken(args):
        raise exc

    monkeypatch.setattr("solotune.train.commands.cmd_eval", broken)
    with pytest.raises(type(exc)):
        cli.main(["eval"])


def test_an_unknown_profile_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown profile 'nope'; known: course, quickstart"):
        TrainConfig.profile("nope")


# --------------------------------------------------------- item 9: full fine-tuning gets its own lr
@pytest.mark.slow
def test_full_finetune_with_the_default_lr_does_not_raise_the_val_loss(smollm2_gguf, tmp_path):
    """The issue's run, shortened for the suite: `solotune finetune --full --max-steps 2 --no-generate`
    on 10 val records (LoRA's 1e-3 made the val loss rise within those steps). The full
    fine-tuning default of the quickstart profile must not."""
    from solotune.train.config import FULL_FINETUNE

    out = tmp_path / "full"
    assert cli.main(["finetune", "--full", "--max-steps", "2", "--val-samples", "10", "--no-generate", "--no-progress",
                     "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == FULL_FINETUNE["quickstart"]["lr"] and summary["mode"] == "full"
    assert summary["val_loss"] <= summary["val_loss_before"], (summary["val_loss_before"], summary["val_loss"])
