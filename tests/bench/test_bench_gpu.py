"""GPU checks of the bench's reference cells: HF + bitsandbytes QLoRA and HF + Liger-Kernel on the
tiny architecture, on the same random rows as solotune's cell (skipped without CUDA or the package)."""

from __future__ import annotations

import pytest
import torch

from solotune.bench.cell import CellSpec, run_cell
from solotune.bench.hf_cell import available, bnb_available, liger_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not available(), reason="transformers/peft not installed")]
KW = dict(model="tiny", samples=3, seq_len=64, data="random", device="cuda")


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes not installed")
def test_hf_bitsandbytes_qlora_cell_runs_on_the_same_rows():
    import bitsandbytes as bnb

    from solotune.bench.hf_cell import build_hf_model

    spec = CellSpec(**KW, precision="bf16", grad_checkpoint="all", quantize="nf4", impl="hf")
    model, _, _ = build_hf_model(spec, torch.device("cuda"))
    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four) == 7 * 2 and all(m.weight.quant_type == "nf4" and m.weight.compress_statistics for m in four)
    del model, four
    hf = run_cell(spec)
    ours = run_cell(CellSpec(**{**spec.to_dict(), "impl": "solotune"}))
    assert hf["status"] == "ok", hf["error"]
    assert (hf["method"], hf["quantize"]) == ("qlora", "nf4") and "after quantization" in hf["peak_note"]
    assert hf["tokens"] == ours["tokens"] == 3 * 64
    assert hf["trainable_params"] == ours["trainable_params"]  # the same adapters on q, v


@pytest.mark.skipif(not liger_available(), reason="liger-kernel not installed")
def test_hf_liger_cell_trains_like_the_hf_cell(tmp_path):
    """Same seed -> the same random weights (Liger swaps forward code, not parameters): the first
    step's loss of HF + Liger equals plain HF's within fp32 kernel differences. The Liger cell runs
    in its own process, as in a bench run: Liger patches transformers' classes process-wide."""
    from solotune.bench.runner import run_cell_subprocess

    spec = CellSpec(**{**KW, "samples": 1}, precision="fp32", impl="hf")
    hf = run_cell(spec)
    with open(tmp_path / "cell.log", "w") as log:
        liger = run_cell_subprocess(CellSpec(**{**spec.to_dict(), "impl": "hf-liger"}), 600, log)
    assert hf["status"] == liger["status"] == "ok", (hf["error"], liger["error"])
    assert liger["mean_loss"] == pytest.approx(hf["mean_loss"], rel=1e-3)
    assert liger["tokens"] == hf["tokens"]
