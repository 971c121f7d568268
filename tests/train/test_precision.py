"""Precision policies: dtypes per mode, fp16 loss scaling skips an overflowed step, non-finite
losses stop an unscaled run, the loss is fp32."""

from __future__ import annotations

import json
import math

import pytest
import torch

from solotune.peft import lora_parameters
from solotune.train import POLICIES, finetune, get_policy
from solotune.train.precision import AmpLossScaler, LossScaler

from train_fixtures import WordTokenizer, tiny_config, tiny_model, write_records


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "records.json")


def test_policy_table():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert {n: (p.param_dtype, p.adapter_dtype, p.autocast_dtype, p.loss_scaling) for n, p in POLICIES.items()
            if n != "fp64"} == {
        "fp32": (f32, f32, None, False),
        "fp16-amp": (f32, f32, f16, True),
        "bf16-amp": (f32, f32, bf16, False),
        "bf16": (bf16, f32, None, False),
    }
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        get_policy("fp8")
    assert isinstance(get_policy("fp16-amp").make_scaler("cpu"), AmpLossScaler)
    assert type(get_policy("bf16").make_scaler("cpu")) is LossScaler


class InjectInf:
    """At step ``n``: puts an inf into one gradient before the update and records the weights."""

    def __init__(self, n: int) -> None:
        self.n, self.before, self.after, self.scales = n, None, None, []

    def before_step(self, model, optimizer, step):
        if step == self.n:
            self.before = [p.detach().clone() for p in model.parameters()]
            next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = math.inf

    def after_step(self, model, optimizer, step):
        if step == self.n:
            self.after = [p.detach().clone() for p in model.parameters()]
        self.adam_steps = [int(s["step"]) for s in optimizer.state.values()]


def test_fp16_amp_skips_a_step_with_inf_gradients(tmp_path, data):
    probe = InjectInf(2)
    model = tiny_model()
    res = finetune(tiny_config(tmp_path, data, max_steps=4, precision="fp16-amp"), model=model,
                   tokenizer=WordTokenizer(), instrument=probe)
    assert res.skipped_steps == 1
    for a, b in zip(probe.before, probe.after):
        assert torch.equal(a, b)  # the overflowed step changed no weight
    assert set(probe.adam_steps) == {3}  # 4 steps, one skipped: AdamW's state saw 3 updates
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, False, False]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(probe.after, model.parameters()))  # later steps train


def test_fp32_stops_on_a_non_finite_loss(tmp_path, data):
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="step 1: training loss is nan"):
        finetune(tiny_config(tmp_path, data, max_steps=2), model=model, tokenizer=WordTokenizer())


@pytest.mark.parametrize("precision", ["bf16", "bf16-amp", "fp16-amp"])
def test_low_precision_modes_train(tmp_path, data, precision):
    model = tiny_model()
    res = finetune(tiny_config(tmp_path, data, max_steps=4, precision=precision), model=model,
                   tokenizer=WordTokenizer())
    want_base = torch.bfloat16 if precision == "bf16" else torch.float32
    assert model.tok_embeddings.weight.dtype == want_base
    assert model.layers[0].attention.wq.base.weight.dtype == want_base
    assert {p.dtype for p in lora_parameters(model)} == {torch.float32}  # adapters stay fp32 everywhere
    assert all(math.isfinite(x) for x in res.losses) and res.skipped_steps == 0
    assert any(p.abs().max() > 0 for p in lora_parameters(model)[1::2])  # B moved off zero


def test_pure_bf16_full_finetune_keeps_everything_bf16(tmp_path, data):
    model = tiny_model()
    res = finetune(tiny_config(tmp_path, data, max_steps=3, precision="bf16", full=True, lr=1e-2), model=model,
                   tokenizer=WordTokenizer())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert res.trainable_params == res.total_params and all(math.isfinite(x) for x in res.losses)


def test_amp_forward_dtype_and_fp32_loss():
    model = tiny_model()
    x = torch.randint(0, 128, (2, 8))
    for name, want in (("fp32", torch.float32), ("bf16-amp", torch.bfloat16), ("fp16-amp", torch.float16)):
        with get_policy(name).autocast("cpu"):
            assert model(x).dtype == want, name
