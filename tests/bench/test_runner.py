"""The bench runner on the tiny model: report files, an injected OOM, Table 1 derivation, cells."""

from __future__ import annotations

import csv
import json
import math

import pytest

from solotune.bench import report
from solotune.bench.cell import INJECT_OOM_ENV, CellSpec, parse_oom_bytes, run_cell
from solotune.bench.runner import AXES, BenchConfig, matrix, run_bench

REQUIRED = ("model", "layers", "seq_len", "micro_batch", "grad_accum", "grad_checkpoint", "precision", "method", "impl",
            "status", "peak_alloc_bytes", "peak_reserved_bytes", "predicted_peak_bytes", "runtime_s", "tokens",
            "tokens_per_s", "mean_loss", "trainable_params", "anatomy", "device", "torch", "date", "command", "mfu")


def test_bench_two_axes_with_an_injected_oom(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors; the cells are subprocesses
    bc = BenchConfig(model="tiny", samples=3, seq_len=32, axes=("precision", "lora"), precision_on="bf16-amp",
                     out=str(tmp_path / "b"), command="solotune bench --model tiny (test)", cell_timeout_s=300)
    cells = matrix(bc)
    victim = next(c for c in cells if c.precision == "bf16-amp" and c.method == "full").cell_id
    monkeypatch.setenv(INJECT_OOM_ENV, victim)
    lines: list[str] = []
    results = run_bench(bc, say=lines.append)

    assert len(results) == 4
    assert sum(1 for ln in lines if ln.startswith("[")) == 4  # one progress line per cell
    by_id = {r["cell_id"]: r for r in results}
    oom = by_id[victim]
    assert oom["status"] == "oom" and oom["oom_request_bytes"] == int(1.5 * 2**30)
    assert oom["predicted_peak_bytes"] > 0  # the planner's requirement is reported for OOM cells
    others = [r for r in results if r["cell_id"] != victim]
    assert [r["status"] for r in others] == ["ok"] * 3
    for r in others:
        assert all(k in r for k in REQUIRED)
        a = r["anatomy"]
        assert a["rest"] >= 0 and a["peak"] == r["peak_alloc_bytes"]
        assert r["tokens"] > 0 and r["runtime_s"] > 0 and math.isfinite(r["mean_loss"])
        assert r["impl"] == "solotune" and r["layers"] == 2
    assert by_id["ga1-gcoff-fp32-lora-solotune"]["trainable_params"] < by_id["ga1-gcoff-fp32-full-solotune"]["trainable_params"]

    out = tmp_path / "b"
    saved = json.loads((out / "cells.json").read_text())
    assert [r["cell_id"] for r in saved] == [r["cell_id"] for r in results]
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok", "oom"}
    assert set(report.CSV_FIELDS) <= set(rows[0])
    for png in ("anatomy.png", "memory_runtime.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for heading in ("## Table 2", "## Table 1", "## Memory anatomy", "## Predicted vs measured", "## Why bf16-amp"):
        assert heading in md
    table2 = [ln for ln in md.split("## Table 2")[1].split("##")[0].splitlines() if ln.startswith("| o")]
    assert len(table2) == 4 and sum("OOM" in ln for ln in table2) == 1
    assert "| Mixed precision |" in md and "| LoRA |" in md  # Table 1 rows
    assert "random init" in md
    assert (out / "bench.log").read_text().count("===== cell") == 4


def test_matrix_order_and_fixed_axes():
    full = matrix(BenchConfig(model="tiny", axes=AXES))
    assert len(full) == 16 and len({c.cell_id for c in full}) == 16
    assert (full[0].grad_accum, full[0].grad_checkpoint, full[0].precision, full[0].method) == (1, "off", "fp32", "full")
    assert (full[-1].grad_accum, full[-1].grad_checkpoint, full[-1].precision, full[-1].method) == (8, "all", "fp16-amp", "lora")
    # the course's column order (GA, mixed precision, LoRA) with checkpointing varying fastest
    assert [(c.grad_accum, c.precision, c.method, c.grad_checkpoint) for c in full[:4]] == [
        (1, "fp32", "full", "off"), (1, "fp32", "full", "all"), (1, "fp32", "lora", "off"), (1, "fp32", "lora", "all")]
    two = matrix(BenchConfig(model="tiny", axes=("ga", "precision"), precision_on="bf16"))
    assert len(two) == 4
    assert {c.method for c in two} == {"lora"} and {c.grad_checkpoint for c in two} == {"off"}
    assert {c.precision for c in two} == {"fp32", "bf16"} and {c.grad_accum for c in two} == {1, 8}
    with pytest.raises(ValueError, match="--axes"):
        BenchConfig(axes=("ga", "speed"))


def test_parse_oom_bytes():
    msg = ("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
           "1.02 GiB is free.")
    assert parse_oom_bytes(msg) == int(1.95 * 2**30)
    assert parse_oom_bytes("Tried to allocate 20.00 MiB") == 20 * 2**20
    assert parse_oom_bytes("something else") is None


def _fake(ga, gc, prec, method, impl="solotune", status="ok", **anat):
    base = dict(params_total=100, grads=0, optimizer=10, activations=50, weight_copies=0, rest=5, grads_total=10,
                optimizer_total=20, max_activations=50, max_weight_copies=0, phase="forward/backward")
    base.update(anat)
    base["peak"] = sum(base[k] for k in ("params_total", "grads", "optimizer", "activations", "weight_copies", "rest"))
    return {"grad_accum": ga, "grad_checkpoint": gc, "precision": prec, "method": method, "impl": impl,
            "status": status, "anatomy": base if status == "ok" else None, "runtime_s": anat.get("runtime", 10.0),
            "peak_alloc_bytes": base["peak"], "predicted": None, "cell_id": f"{ga}{gc}{prec}{method}{impl}"}


def test_table1_arrows_come_from_measured_deltas():
    results = [
        _fake(1, "off", "fp32", "lora"),
        _fake(1, "all", "fp32", "lora", activations=5, max_activations=5, runtime=13.0),
        _fake(1, "off", "fp16-amp", "lora", activations=30, max_activations=30, weight_copies=60,
              max_weight_copies=60, runtime=5.0),
        _fake(1, "off", "fp32", "full", status="oom"),
    ]
    lines = report.table1(results, ["gc", "precision", "lora"])
    gc = next(ln for ln in lines if ln.startswith("| Gradient checkpointing"))
    cols = [c.strip() for c in gc.split("|")[1:-1]]
    assert cols[1] == "– (+0%)"  # parameters
    assert cols[4].startswith("↓ −90%")  # activations 50 -> 5
    assert cols[7].startswith("↑ +30%")  # runtime 10 -> 13
    mp = next(ln for ln in lines if ln.startswith("| Mixed precision"))
    assert "↑ (new)" in mp and "↓ −40%" in mp and "↓ −50%" in mp
    lora = next(ln for ln in lines if ln.startswith("| LoRA"))
    assert lora.rstrip().endswith("| 0 |") and "n/a" in lora  # its only pair OOMed, no prediction to fall back on


def test_amp_explanation_is_computed_from_the_pair():
    off = _fake(1, "off", "fp32", "lora", activations=40, max_activations=40)
    on = _fake(1, "off", "fp16-amp", "lora", activations=25, max_activations=25, weight_copies=60, max_weight_copies=60)
    text = "\n".join(report.explain_amp([off, on], "fp16-amp", report.Units(100)))
    assert "**raised**" in text
    assert "Autocast weight copies appear" in text and "shrink" in text
    u = report.Units(100)
    assert f"{u(off['anatomy']['peak'])} to {u(on['anatomy']['peak'])}" in text


def test_cell_reports_errors_instead_of_raising():
    r = run_cell(CellSpec(model="no-such-preset-or-path", samples=2, seq_len=16, device="cpu"))
    assert r["status"] == "error" and "no-such-preset-or-path" in r["error"]


@pytest.mark.skipif(not __import__("solotune.bench.hf_cell", fromlist=["available"]).available(),
                    reason="transformers/peft not installed")
def test_hf_reference_cell_runs_on_cpu():
    hf = run_cell(CellSpec(model="tiny", samples=2, seq_len=24, impl="hf", method="lora", precision="bf16-amp",
                           device="cpu"))
    ours = run_cell(CellSpec(model="tiny", samples=2, seq_len=24, impl="solotune", method="lora",
                             precision="bf16-amp", device="cpu"))
    assert hf["status"] == "ok", hf["error"]
    assert hf["trainable_params"] == ours["trainable_params"]  # same adapters (r16 on q/v)
    assert hf["tokens"] == ours["tokens"]  # same data
    assert hf["anatomy"]["weight_copies"] > 0 and hf["anatomy"]["rest"] >= 0


def test_time_budget_extrapolates_and_still_sees_the_longest_example():
    r = run_cell(CellSpec(model="tiny", samples=12, seq_len=64, grad_accum=2, time_budget_s=1e-6, device="cpu"))
    assert r["status"] == "ok", r["error"]
    # stopped at the first chance: after the 2 warm-up steps and one steady-state step
    assert r["steps"] == 3 and r["samples_done"] == 6
    assert r["warmup_steps"] == 2 and r["steady_steps"] == 1 and r["steady_tokens_per_s"] > 0
    assert r["runtime_extrapolated"] and r["runtime_s"] > r["runtime_measured_s"]
    assert r["tokens_total"] > r["tokens"]
    assert r["max_seq_len_seen"] == r["max_seq_len_data"]  # the longest example was moved into step 2


def test_precision_facts_come_from_the_policy():
    """Cells, runner (and planner) read dtypes and byte widths from PrecisionPolicy alone."""
    import torch

    from solotune.bench.cell import load_cell_model
    from solotune.train.precision import TRAINING_PRECISIONS, get_policy

    want = {  # name: (weights, compute, weight bytes, compute bytes, amp)
        "fp32": ("fp32", "fp32", 4, 4, False), "fp16-amp": ("fp32", "fp16", 4, 2, True),
        "bf16-amp": ("fp32", "bf16", 4, 2, True), "bf16": ("bf16", "bf16", 2, 2, False),
    }
    assert TRAINING_PRECISIONS == tuple(want)
    for name, facts in want.items():
        p = get_policy(name)
        assert (p.param_dtype_name, p.compute_dtype_name, p.param_bytes, p.compute_bytes, p.amp) == facts, name
        assert p.adapter_dtype_name == "fp32" and p.adapter_bytes == 4
    model, _, _, _ = load_cell_model(CellSpec(model="tiny", precision="bf16", device="cpu"), torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="precision-on"):
        BenchConfig(precision_on="fp64")


def test_offloaded_cell_records_its_host_copies_as_the_planner_predicts_them():
    """cells.json's host_peak_bytes (the loop's metrics: the offload's host copies at most) equals the
    planner's host_bytes for the cell's longest micro-batch, byte for byte on CPU."""
    r = run_cell(CellSpec(model="tiny", samples=4, seq_len=512, method="lora", precision="bf16", device="cpu",
                          quantize="nf4", offload="activations", grad_checkpoint="all"))
    assert r["status"] == "ok", r["error"]
    assert r["host_peak_bytes"] == r["predicted"]["host_bytes"] > 0
    assert "host_peak_bytes" not in run_cell(CellSpec(model="tiny", samples=2, seq_len=64, device="cpu"))


@pytest.mark.parametrize("quantize, method", [("nf4", "qlora"), ("int8", "int8-lora")])
def test_quantized_cell_records_its_method_and_measures_the_quantized_model(quantize, method):
    kw = dict(model="tiny", samples=4, seq_len=32, method="lora", precision="bf16", device="cpu")
    q = run_cell(CellSpec(**kw, quantize=quantize, offload="activations", grad_checkpoint="all"))
    plain = run_cell(CellSpec(**kw))
    assert q["status"] == "ok", q["error"]
    assert (q["method"], q["quantize"], q["offload"]) == (method, quantize, "activations")
    assert q["cell_id"].endswith(f"-{method}-offloadactivations-solotune") and plain["method"] == "lora"
    assert q["trainable_params"] == plain["trainable_params"] and q["total_params"] == plain["total_params"]
    # the measured anatomy counts the quantized storage (codes + scales) as the base's weights
    import torch

    from solotune.config import PRESETS
    from solotune.model import Transformer
    from solotune.quant import quantized_modules, swap_in_quantized

    with torch.device("meta"):
        meta = swap_in_quantized(Transformer(PRESETS["tiny"]), quantize, compute_dtype=torch.bfloat16)
    assert q["anatomy"]["params"][quantize] == sum(m.weight_bytes() for m in quantized_modules(meta).values())
    assert q["anatomy"]["params_total"] < plain["anatomy"]["params_total"]


def test_bench_refuses_an_unknown_reference():
    from solotune.errors import ConfigError

    with pytest.raises(ConfigError, match="--reference"):
        BenchConfig(reference="hf,torchtune")
    assert BenchConfig(reference="hf, hf-liger,hf").references == ("hf", "hf-liger")


def test_capped_cells_get_expandable_segments_unless_the_user_chose():
    from solotune.bench.cell import CellSpec
    from solotune.bench.runner import cell_env

    capped = CellSpec(model="tiny", memory_limit_bytes=24 << 30)
    assert cell_env(capped, {"A": "1"})["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert cell_env(capped, {"PYTORCH_CUDA_ALLOC_CONF": "backend:native"})["PYTORCH_CUDA_ALLOC_CONF"] == "backend:native"
    plain = cell_env(CellSpec(model="tiny"), {"A": "1"})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in plain and plain["A"] == "1" and plain["PYTHONUNBUFFERED"] == "1"
