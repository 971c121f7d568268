"""Resume: N straight steps == k steps, interrupt (Ctrl-C or a saved checkpoint), resume, N - k more
steps -- bit for bit, on CPU fp32 -- plus the checks around it."""

from __future__ import annotations

import json

import pytest
import torch

from solotune.train import finetune
from solotune.train.state import list_checkpoints, load_checkpoint

from train_fixtures import CtrlCAfter, WordTokenizer, tiny_config, tiny_model, write_records


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "records.json")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# Dropout on (the resumed run must continue the dropout RNG stream), a warmup + cosine schedule,
# weight decay, and 10 steps of 4 examples over 32 records: the run crosses an epoch boundary
# after the interruption.
CASES = {
    "lora": dict(lora_dropout=0.1, warmup_steps=2, weight_decay=0.1, eval_every=3),
    "full": dict(full=True, lr=3e-3, warmup_steps=2, weight_decay=0.1),
    "lora-every2-ckpt": dict(lora_dropout=0.1, grad_checkpoint="every:2", lora_targets=("wq", "wk", "w1")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ctrl_c_then_resume_is_bitwise_identical(tmp_path, data, case):
    kw = dict(max_steps=10, **CASES[case])
    straight = tiny_model()
    finetune(tiny_config(tmp_path, data, output_dir=str(tmp_path / "straight"), **kw), model=straight,
             tokenizer=WordTokenizer())

    cfg = tiny_config(tmp_path, data, output_dir=str(tmp_path / "cut"), **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(4))
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [4]
    resumed = tiny_model()
    res = finetune(cfg.replace(resume=str(tmp_path / "cut")), model=resumed, tokenizer=WordTokenizer())

    assert res.steps == 10 and res.resumed_from.name == "step-000004"
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "cut")  # metrics.jsonl continues seamlessly


def test_resume_from_a_periodic_checkpoint_folder(tmp_path, data):
    """--resume also takes one checkpoint folder; the run that wrote it may have gone on past it."""
    straight = tiny_model()
    cfg = tiny_config(tmp_path, data, max_steps=8, save_every=3, lora_dropout=0.1,
                      output_dir=str(tmp_path / "a"))
    finetune(cfg, model=straight, tokenizer=WordTokenizer())
    resumed = tiny_model()
    finetune(cfg.replace(resume=str(tmp_path / "a" / "checkpoints" / "step-000003"), output_dir=str(tmp_path / "b")),
             model=resumed, tokenizer=WordTokenizer())
    for k, v in _state(straight).items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # steps 1-3 carried over from the first run


def test_fp16_amp_resume_restores_the_loss_scale(tmp_path, data):
    kw = dict(max_steps=6, precision="fp16-amp")
    straight = tiny_model()
    finetune(tiny_config(tmp_path, data, output_dir=str(tmp_path / "s"), **kw), model=straight,
             tokenizer=WordTokenizer())
    cfg = tiny_config(tmp_path, data, output_dir=str(tmp_path / "c"), **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(3))
    assert "grad_scaler" in load_checkpoint(tmp_path / "c").trainer["scaler"]
    resumed = tiny_model()
    finetune(cfg.replace(resume=str(tmp_path / "c")), model=resumed, tokenizer=WordTokenizer())
    for k, v in _state(straight).items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_refuses_different_settings(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=4, save_every=2)
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match="lr: checkpoint 0.01 vs now 0.02"):
        finetune(cfg.replace(resume=cfg.output_dir, lr=0.02), model=tiny_model(), tokenizer=WordTokenizer())


def test_resume_errors_are_clear(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=2)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        finetune(cfg.replace(resume=str(tmp_path / "nope")), model=tiny_model(), tokenizer=WordTokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        finetune(cfg.replace(resume=str(tmp_path / "empty")), model=tiny_model(), tokenizer=WordTokenizer())
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    state = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="trainer_state.pt: cannot be read"):
        finetune(cfg.replace(resume=str(tmp_path / "run")), model=tiny_model(), tokenizer=WordTokenizer())


def test_trainer_state_loads_with_weights_only(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=2, precision="fp16-amp")
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["data"]) == {"epoch", "index"}
    assert {"optimizer", "scheduler", "scaler", "rng", "tokens"} <= state.keys()


def test_ctrl_c_during_an_update_is_held_until_it_is_done(monkeypatch):
    import os
    import signal

    from solotune.train.interrupts import deferred_signals

    # Python's own Ctrl-C handler, whatever pytest was started with (a background job ignores SIGINT).
    monkeypatch.setattr(signal, "_test_prev", signal.signal(signal.SIGINT, signal.default_int_handler), raising=False)
    done = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)  # delivered now, acted on only when the block ends
                done = True
        assert done
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, signal._test_prev)


def test_a_trainer_state_with_code_in_it_is_refused_without_running_it(tmp_path, data):
    """A checkpoint someone handed you: its pickle would run code; resume refuses it plainly."""
    import os

    cfg = tiny_config(tmp_path, data, max_steps=2)
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.pt"
    torch.save({"step": 2, "payload": Payload()}, state)
    with pytest.raises(ValueError, match="contains code or Python objects") as info:
        finetune(cfg.replace(resume=str(tmp_path / "run")), model=tiny_model(), tokenizer=WordTokenizer())
    assert "weights_only=False" not in str(info.value) and not marker.exists()
