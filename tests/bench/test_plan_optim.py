"""The planner's optimizer options (8-bit AdamW, in backward, state offload) against the real
optimizer state on CPU through the training loop, structural facts of their predictions, the
cheapest-technique choice behind ``bench --optimizer auto``, and ``plan`` at 24 GiB for 7B."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.bench.anatomy import AnatomyInstrument, TensorMeter
from solotune.bench.cell import CellSpec, FoldedTokenizer
from solotune.bench.plan import (
    GiB, Setup, cheapest_fitting, grad_bytes, model_config, optimizer_bytes, plan, predict, relative_cost,
)
from solotune.config import ModelConfig
from solotune.errors import ConfigError
from solotune.model import build_model
from solotune.tokenizer import load_tokenizer
from solotune.train import TrainConfig, finetune

GQA = ModelConfig(name="tiny-gqa", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                  max_seq_len=256)
SEVEN_B = model_config("llama2-7b")


def _full(**kw) -> Setup:
    return Setup(SEVEN_B, seq_len=512, grad_checkpoint="all", precision="bf16", lora_rank=0, **kw)


@pytest.mark.parametrize("opts", [dict(), dict(optimizer_in_backward=True)])
def test_measured_8bit_state_equals_the_planner(tmp_path, opts):
    """GQA at dim 64: its matrices (>= 4096 elements) get 8-bit moments, its norms fp32 ones."""
    model = build_model(GQA, seed=0, dtype=torch.bfloat16)
    tc = TrainConfig(model=GQA.name, data="alpaca-sample", output_dir=str(tmp_path / "run"), epochs=1, max_samples=3,
                     batch_size=1, grad_accum=1, precision="bf16", full=True, max_grad_norm=None,
                     optimizer="adamw-8bit", grad_checkpoint="all", max_seq_len=40, val_samples=0,
                     generate_samples=False, progress=False, device="cpu", log_every=10**9, **opts)
    inst = AnatomyInstrument(model, TensorMeter())
    with inst.meter.tracking(model), contextlib.redirect_stdout(io.StringIO()):
        finetune(tc, model=model, tokenizer=FoldedTokenizer(load_tokenizer(BUNDLED_LLAMA2_TOKENIZER), 256),
                 instrument=inst)
    inst.close()
    s = Setup(GQA, seq_len=40, grad_checkpoint="all", precision="bf16", lora_rank=0, optimizer="adamw-8bit",
              device="cpu", **opts)
    assert inst.optimizer_total == optimizer_bytes(s) > 0
    # in backward every gradient is gone before the step; otherwise all of them are there
    assert inst.grads_total == (0 if opts else grad_bytes(s))


def test_8bit_states_are_about_two_bytes_per_parameter():
    plain, q = predict(_full()), predict(_full(optimizer="adamw-8bit"))
    n = plain.trainable_params
    assert plain.optimizer == 2 * 2 * n + 4 * 291  # bf16 moments + a step per tensor (291 tensors)
    assert 2 * n < q.optimizer < 2.05 * n


def test_in_backward_removes_the_full_gradients():
    q, inb = predict(_full(optimizer="adamw-8bit")), predict(_full(optimizer="adamw-8bit", optimizer_in_backward=True))
    largest = 32000 * 4096 * 2  # the embedding's (and the head's) bf16 gradient
    assert inb.grads == largest and q.grads == grad_bytes(_full())
    assert inb.peak_step == inb.params_total + inb.optimizer  # step() has nothing left to do
    assert q.peak - inb.peak > 0.9 * (q.grads - largest)
    with pytest.raises(ValueError, match="grad_accum"):
        _full(optimizer_in_backward=True).replace(grad_accum=2)


def test_state_offload_moves_the_state_to_the_host():
    inb = predict(_full(optimizer="adamw-8bit", optimizer_in_backward=True))
    off = predict(_full(optimizer="adamw-8bit", optimizer_in_backward=True, offload="optimizer"))
    assert off.optimizer == 0 and off.host_bytes == inb.optimizer
    assert inb.peak - off.peak > 0.85 * inb.optimizer  # a few tensors' states stay in flight
    both = _full(optimizer="adamw-8bit", offload="activations,optimizer")
    assert predict(both).host_bytes > predict(both.replace(offload="optimizer")).host_bytes
    # offload costs PCIe time in the ranking; 8-bit states and in-backward cost none
    assert relative_cost(_full(optimizer="adamw-8bit", offload="optimizer")) > relative_cost(_full()) \
        == relative_cost(_full(optimizer="adamw-8bit", optimizer_in_backward=True))


def test_cheapest_fitting_technique():
    s = _full()
    assert cheapest_fitting(s, 200 * GiB) == s  # it fits as it is: nothing changes
    c = cheapest_fitting(s, 40 * GiB)
    assert (c.optimizer, c.optimizer_in_backward, c.offload) == ("adamw-8bit", False, "none")
    c = cheapest_fitting(s, 30 * GiB)  # grads + 8-bit states no longer fit together
    assert (c.optimizer, c.optimizer_in_backward, c.offload) == ("adamw-8bit", True, "none")
    c = cheapest_fitting(s, 20 * GiB)
    assert (c.optimizer, c.optimizer_in_backward, c.offload) == ("adamw-8bit", True, "optimizer")
    assert cheapest_fitting(s, 10 * GiB) is None
    assert cheapest_fitting(s.replace(grad_accum=8), 30 * GiB).offload == "optimizer"  # no in-backward with GA


def test_plan_at_24gib_lists_full_fine_tuning(capsys):
    from solotune.cli import main

    assert main(["plan", "--model", "llama2-7b", "--gpu-mem", "24GiB", "--precisions", "bf16",
                 "--checkpointing", "all"]) == 0
    out = capsys.readouterr().out
    fits = out.split("Fits")[1].split("more configurations")[0]
    assert "| full adamw-8bit +in-backward +offload(optimizer) | bf16 | all |" in fits
    rows = plan(SEVEN_B, 24 * GiB, precisions=("bf16",), checkpointing=("all",), methods=("full",),
                full_optimizers=(("adamw-8bit", True, True),))
    assert rows[0][2] and rows[0][0].setup.batch == 8 and rows[0][0].setup.grad_accum == 1


def test_bench_auto_gives_each_full_cell_a_technique_that_fits():
    from solotune.bench.runner import BenchConfig, matrix

    cells = matrix(BenchConfig(optimizer="auto", memory_limit_bytes=80 * GiB))
    full = [c for c in cells if c.method == "full"]
    assert len(full) == 8 and all(c.optimizer == "adamw" for c in cells if c.method == "lora")
    assert all(c.optimizer == "adamw-8bit" for c in full)  # plain AdamW needs ~100 GiB at fp32 weights
    assert all(not c.optimizer_in_backward for c in full if c.grad_accum > 1)
    assert "-adamw-8bit" in full[0].cell_id


def test_cell_spec_checks_its_optimizer_fields():
    with pytest.raises(ConfigError, match="optimizer"):
        CellSpec(optimizer="sgd")
    with pytest.raises(ConfigError, match="grad_accum"):
        CellSpec(optimizer_in_backward=True, grad_accum=8)
    c = CellSpec(method="full", optimizer="adamw-8bit", optimizer_in_backward=True, offload="optimizer")
    assert c.cell_id.endswith("full-adamw-8bit-inbwd-offloadoptimizer-solotune")
    assert CellSpec.from_dict(c.to_dict()) == c


def test_report_names_each_cells_optimizer_technique():
    from solotune.bench.report import optimizer_label

    assert optimizer_label({"optimizer": "adamw"}) == "adamw"
    assert optimizer_label({}) == "adamw"  # cells recorded before the field existed
    assert optimizer_label({"optimizer": "adamw-8bit", "optimizer_in_backward": True,
                            "offload": "activations,optimizer"}) == "adamw-8bit + in backward + state offload"
