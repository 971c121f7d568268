"""--tensorboard (metrics.jsonl's scalars as TensorBoard events; the package is optional) and the
``template`` field across resume (checkpoints written before it existed still resume)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from solotune.cli import main
from solotune.train import finetune
from solotune.train.metrics import tensorboard_scalars
from solotune.train.state import list_checkpoints

from train_fixtures import CtrlCAfter, WordTokenizer, tiny_config, tiny_model, write_records


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not installed here)."""

    opened: list["FakeWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.flushes, self.closed = log_dir, purge_step, [], 0, False
        FakeWriter.opened.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((global_step, tag, value))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.opened = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    return FakeWriter


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "records.json")


def _jsonl(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_the_jsonl_scalars_and_resume_purges(tmp_path, data, fake_tensorboard) -> None:
    tb = tmp_path / "tb"
    cfg = tiny_config(tmp_path, data, max_steps=5, eval_every=2, tensorboard=str(tb))
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(3))
    finetune(cfg.replace(resume=cfg.output_dir), model=tiny_model(), tokenizer=WordTokenizer())
    first, second = fake_tensorboard.opened
    assert (first.log_dir, first.purge_step, second.purge_step) == (str(tb), None, 4)  # resumed after step 3
    assert first.closed and second.closed and second.flushes == 2  # flushed every step: watchable live
    records = _jsonl(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    want = [(r["step"], k, v) for r in records for k, v in tensorboard_scalars(r).items()]
    got = [s for s in first.scalars if s[0] <= 3] + second.scalars
    assert got == want
    tags = {t for _, t, _ in got}
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "peak_mem", "val_loss"} <= tags and "step" not in tags
    assert [s for s, t, _ in got if t == "val_loss"] == [2, 4]


def test_tensorboard_missing_is_one_line_before_loading(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    rc = main(["finetune", "--tensorboard", str(tmp_path / "tb"), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("solotune finetune: error: --tensorboard needs the optional 'tensorboard' package "
                               "(pip install tensorboard)")
    assert not (tmp_path / "run").exists()


def test_real_tensorboard_events(tmp_path, data) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, data, max_steps=3, tensorboard=str(tmp_path / "tb"))
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in _jsonl(tmp_path / "run")])


def test_checkpoint_without_template_field_resumes(tmp_path, data) -> None:
    """A checkpoint written before ``template``/``tensorboard`` existed (its config.json lacks them)
    resumes as ``auto`` (on Alpaca records: the Alpaca prompt it was trained with); a different
    template is refused like any trajectory change."""
    cfg = tiny_config(tmp_path, data, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(2))
    (ckpt,) = [p for _, p in list_checkpoints(tmp_path / "run")]
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["template"] == "auto"
    for k in ("template", "tensorboard"):
        del saved[k]
    (ckpt / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="template: checkpoint 'auto' vs now 'chat'"):
        finetune(cfg.replace(resume=cfg.output_dir, template="chat"), model=tiny_model(), tokenizer=WordTokenizer())
    res = finetune(cfg.replace(resume=cfg.output_dir), model=tiny_model(), tokenizer=WordTokenizer())
    assert res.steps == 4
