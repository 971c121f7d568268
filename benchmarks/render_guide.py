"""Render docs/guide.md (the technique guide) from the committed result files.

Every number in the guide is read here from ``benchmarks/results/*`` (cells.json of ``solotune
bench`` runs, results.json of the probe scripts); none is typed in. A result file that does not
exist yet renders as "not measured yet (run ...)" instead of a number.
``tests/test_guide.py`` checks that the committed guide equals this script's output.

    python3 benchmarks/render_guide.py           # rewrite docs/guide.md
    python3 benchmarks/render_guide.py --check   # exit 1 when docs/guide.md is stale
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GUIDE = REPO / "docs" / "guide.md"
GUIDE_RUN = "not measured yet (run `bash benchmarks/run_guide_h200.sh OUT` on a GPU, copy OUT to " \
            "`benchmarks/results/guide-h200/`, re-render)"
GC_KS = (1, 2, 4, 6, 8)  # every:K; 6 ~ sqrt(32)


# ------------------------------------------------------------------------------------ reading
def read_json(rel: str) -> Any:
    p = RESULTS / rel
    return json.loads(p.read_text()) if p.is_file() else None


def cells(rel: str) -> list[dict[str, Any]]:
    """The solotune cells of one bench folder's cells.json ([] when the file is missing)."""
    return [c for c in read_json(f"{rel}/cells.json") or [] if c.get("impl") == "solotune"]


def cell(rel: str, **match: Any) -> dict[str, Any] | None:
    found = [c for c in cells(rel) if all(c.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def gib(b: float | None, nd: int = 1) -> str:
    return "—" if b is None else f"{b / 2**30:.{nd}f} GiB"


def gb(b: float | None, nd: int = 2) -> str:
    return "—" if b is None else f"{b / 1e9:.{nd}f} GB"


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def source(rel: str, c: dict[str, Any] | None = None) -> str:
    """Where a number comes from: the file, and the device/date when the cell records them."""
    extra = f"; {c.get('device')}, {str(c.get('date', ''))[:10]}" if c and c.get("device") else ""
    return f"*Source: `benchmarks/results/{rel}`{extra}.*"


# ------------------------------------------------------------------------------------ sections
def intro() -> str:
    return """# The technique guide

The questions the course asks about each fine-tuning technique, answered with numbers solotune
measured on this project's GPUs, and a pointer to the code and the test behind each answer.

Every number below is read from a committed result file under `benchmarks/results/` by
`benchmarks/render_guide.py`, which writes this page; `tests/test_guide.py` fails when the page and
the files disagree. Where a measurement has not been made yet the page says so instead of guessing.
Unless a row says otherwise: the Llama-2-7B architecture with random weights, the course's 200
Alpaca records, LoRA r16 α32 on `wq,wv`, one GPU, peak = `torch.cuda.max_memory_allocated`.
"""


def accumulation() -> str:
    g1 = cell("bench-7b", cell_id="ga1-gcoff-fp32-lora-solotune")
    g8 = cell("bench-7b", cell_id="ga8-gcoff-fp32-lora-solotune")
    course = cell("seams-h200/new/course-new", cell_id="ga8-gcoff-bf16-lora-solotune")
    mb8 = cell("seams-h200/new/mb8-new", cell_id="ga1-gcoff-bf16-lora-solotune")
    rows = [["fp32, batch 1, no accumulation", gib(g1 and g1["peak_alloc_bytes"]), "1"],
            ["fp32, batch 1 × accumulation 8", gib(g8 and g8["peak_alloc_bytes"]), "8"],
            ["bf16, batch 1 × accumulation 8 (the course cell)", gib(course and course["peak_alloc_bytes"], 2), "8"],
            ["bf16, batch 8, no accumulation", gib(mb8 and mb8["peak_alloc_bytes"], 2), "8"]]
    return f"""## Gradient accumulation

**Why does dividing by k make k micro-batches equal one batch?** The loss of a batch is the sum
of the per-token losses divided by the number of target tokens. Gradients are linear, so running
k micro-batches, each contributing *its summed loss divided by the whole window's target-token
count*, and adding their gradients gives exactly the gradient of the one big batch. solotune's
loss returns the fp32 sum (`train/loss.py`) and `train_step` divides by the window's token count
(`train/step.py`). "Divide by k" is that rule when every micro-batch has the same number of
target tokens.

**Why is averaging per micro-batch wrong with uneven lengths?** Taking each micro-batch's *mean*
and dividing by k weights every micro-batch equally, so a token in a short example counts more
than a token in a long one — a different objective from the big batch's. Proof in the suite:
`tests/train/test_loop.py::test_grad_accumulation_equals_one_big_batch` (4 micro-batches of 1 ==
1 batch of 4, float64, to 1e-6, LoRA and full) and `::test_accumulation_weights_tokens_not_micro_batches`
(the window's examples do have different target counts, so the equality is not a coincidence).

**What does it cost?** Peak memory follows the micro-batch, not the effective batch:

{table(["setting", "peak", "examples per step"], rows)}

{source("bench-7b/cells.json and seams-h200/new/*/cells.json", g1)}

**Why does batch norm break the equivalence?** Batch norm normalises with statistics over the
micro-batch, so an example's activations depend on which other examples share its micro-batch:
k micro-batches compute different functions than one big batch, whatever the loss scaling.
LLaMA's RMSNorm normalises each token on its own (`model.py` `RMSNorm`), so rows never interact;
`tests/data/test_batch.py` checks that a packed row equals the same documents padded (float64).
There is no number to measure here: solotune has no batch norm.
"""


def inference() -> str:
    probes = read_json("guide-h200/probes/results.json")
    if probes is None:
        body = GUIDE_RUN
    else:
        meta = probes["meta"]
        rows = [[r["mode"].replace("_", " "), f"{r['batch']} × {r['seq']}", gib(r["peak_above_weights_bytes"], 2),
                 gib(r["held_after_forward_bytes"], 2), gib(r["logits_bytes"], 2)] for r in probes["forward"]]
        ng, wg = (next(r for r in probes["forward"] if r["mode"] == m) for m in ("no_grad", "grad"))
        body = (table(["forward", "batch × tokens", "peak above weights", "alive after forward", "of which logits"], rows)
                + f"\n\nWith grad the forward keeps {wg['held_after_forward_bytes'] / max(ng['held_after_forward_bytes'], 1):.1f}× "
                  f"the memory alive (weights {gib(meta['weights_bytes'])}).\n\n"
                + f"*Source: `benchmarks/results/guide-h200/probes/results.json`; {meta['device']}, {meta['date'][:10]}.*")
    return f"""## Inference: why no activation blow-up?

A training forward must keep each layer's inputs (and the attention/MLP intermediates) until
backward uses them, so its memory grows with layers × tokens. Under `torch.no_grad()` /
`inference_mode` nothing is saved: each layer's activations are freed as soon as the next layer
has read them, so the peak above the weights is about one layer's working set plus the logits.
Measured on one forward (`benchmarks/guide_probes.py`, pure bf16):

{body}
"""


def checkpointing() -> str:
    off = cell("bench-7b", cell_id="ga1-gcoff-fp32-lora-solotune")
    on = cell("bench-7b", cell_id="ga1-gcall-fp32-lora-solotune")
    m_off = cell("seams-h200/new/mb8-new", cell_id="ga1-gcoff-bf16-lora-solotune")
    m_on = cell("seams-h200/new/mb8-new", cell_id="ga1-gcall-bf16-lora-solotune")

    def row(name: str, c: dict[str, Any] | None) -> list[str]:
        if c is None:
            return [name, "—", "—", "—"]
        act = (c.get("anatomy") or {}).get("activations")
        star = "*" if c.get("runtime_extrapolated") else ""
        return [name, gib(c["peak_alloc_bytes"], 2), gb(act), f"{c['tokens_per_s']:,.0f}{star}"]

    have = [row("fp32, batch 1, off", off), row("fp32, batch 1, all", on),
            row("bf16, batch 8, off", m_off), row("bf16, batch 8, all", m_on)]
    sweep = ([("off", "guide-h200/gc-off")] + [(f"every:{k}", f"guide-h200/gc-every{k}") for k in GC_KS]
             + [("selective", "guide-h200/gc-selective")])
    found = {name: (cells(rel) or [None])[0] for name, rel in sweep}
    if all(c is None for c in found.values()):
        sweep_body = GUIDE_RUN
    else:
        n = next(c for c in found.values() if c)["layers"]
        rows = []
        for name, c in found.items():
            k = int(name.split(":")[1]) if ":" in name else None
            blocks = {"off": "0", "selective": f"{n} (pointwise ops only)"}.get(name) or str(len(range(0, n, k)))
            rows.append(row(name, c)[:1] + [blocks] + row(name, c)[1:] if c else [name, blocks, "not measured yet", "", ""])
        base = found.get("off")
        sweep_body = table(["policy", "blocks recomputed", "peak", "saved activations", "tokens/s"], rows)
        if any(c is None for c in found.values()):
            sweep_body += "\n\nMissing rows: " + GUIDE_RUN + "."
        if base:
            sweep_body += "\n\n" + _sqrt_reading(found, n)
        sweep_body += "\n\n" + source("guide-h200/gc-*/cells.json", base)
    speed = (f"{m_off['tokens_per_s'] / m_on['tokens_per_s']:.2f}×" if m_off and m_on else "—")
    return f"""## Activation checkpointing

**What does it trade?** A checkpointed block keeps only its input; backward runs its forward again
to rebuild the rest: memory for compute, one more forward per checkpointed block (forward +
backward ≈ 3 forwards of work, so ~4/3 in FLOPs; the measured slowdown is below).

{table(["setting", "peak", "saved activations (anatomy)", "tokens/s"], have)}

At batch 8, checkpointing every block cut the peak from {gib(m_off and m_off['peak_alloc_bytes'], 2)} to
{gib(m_on and m_on['peak_alloc_bytes'], 2)} and training was {speed} slower (full 200 records, not extrapolated).
\\* extrapolated from a 4 s per-cell budget: read those speeds as rough.
{source("bench-7b/cells.json and seams-h200/new/mb8-new/cells.json", m_off)}

**Over `every:K`** (`--grad-checkpoint every:K` recomputes blocks 0, K, 2K, …; K = 1 is `all`,
K = 6 ≈ √32). Does memory follow O(√n)? Chen et al.'s √n scheme keeps only segment boundaries and
recomputes one segment of √n blocks at a time, so it stores O(√n) block inputs plus one segment's
activations. `every:K` is a different policy: it checkpoints one block in K and keeps the other
blocks' activations, so its saved activations should be about (1 − 1/K) of no checkpointing's,
not O(√n). `selective` recomputes only the cheap pointwise ops of every block and keeps the
matmul and attention outputs. The sweep (batch 8, bf16) tests that:

{sweep_body}

Code: `model.py` `checkpoint_policy`; same gradients with and without it:
`tests/train/test_loop.py::test_grad_checkpointing_gives_the_same_gradients` (dropout replayed).
"""


def _sqrt_reading(found: dict[str, dict[str, Any] | None], n: int) -> str:
    """A one-line reading of the sweep: saved activations of every:K relative to off."""
    base = (found["off"].get("anatomy") or {}).get("activations")
    parts = []
    for name, c in found.items():
        act = (c or {}).get("anatomy", {}).get("activations") if c else None
        if name.startswith("every:") and act and base:
            k = int(name.split(":")[1])
            parts.append(f"{name} keeps {act / base:.2f} of off's activations (1 − 1/K = {1 - 1 / k:.2f})")
    return ("Measured: " + "; ".join(parts) + f". For comparison, √n/n = {math.sqrt(n) / n:.2f} for n = {n}."
            if parts else "")


def lora() -> str:
    c = cell("bench-7b", cell_id="ga1-gcoff-fp32-lora-solotune")
    full = cell("bench-7b", cell_id="ga1-gcoff-fp32-full-solotune")
    if c is None:
        return "## LoRA\n\n" + GUIDE_RUN + "\n"
    a, p = c["anatomy"], (full or {}).get("predicted") or {}
    rows = [["weights", gb(a["params_total"]), gb(sum((p.get("params") or {}).values()) or None)],
            ["gradients", gb(a["grads_total"]), gb(p.get("grads"))],
            ["AdamW state", gb(a["optimizer_total"]), gb(p.get("optimizer"))],
            ["saved activations", gb(a["activations"]), gb(p.get("activations"))],
            ["peak", gib(c["peak_alloc_bytes"]), gib(p.get("peak")) + " (OOM on 80 GB)" if p else "—"]]
    return f"""## LoRA

**How much is trained?** LoRA r16 on `wq,wv`: {c['trainable_params']:,} of {c['total_params']:,}
parameters ({100 * c['trainable_params'] / c['total_params']:.3f}%). Only those need gradients and
optimizer state; the frozen base needs neither.

**Memory per component** (fp32, batch 1, no checkpointing; LoRA measured by the bench's anatomy,
full fine-tuning as the planner predicts it, since that cell ran out of memory):

{table(["component", "LoRA (measured)", "full fine-tuning (predicted)"], rows)}

{source("bench-7b/cells.json", c)}
Code: `peft/lora.py` (`LoRALinear`, `apply_lora`); parity with HF PEFT:
`tests/train/test_peft_parity.py`, `tests/peft/test_peft_export.py`.
"""


def precision() -> str:
    f32 = cell("bench-7b", cell_id="ga1-gcoff-fp32-lora-solotune")
    f16 = cell("bench-7b", cell_id="ga1-gcoff-fp16-amp-lora-solotune")
    bf16 = cell("seams-h200/new/course-new", cell_id="ga8-gcoff-bf16-lora-solotune")
    f32g8 = cell("bench-7b", cell_id="ga8-gcoff-fp32-lora-solotune")
    if not (f32 and f16):
        return "## Mixed precision\n\n" + GUIDE_RUN + "\n"
    a, b = f32["anatomy"], f16["anatomy"]
    rows = [["weights (fp32 master)", gb(a["params_total"]), gb(b["params_total"])],
            ["fp16 weight copies made by autocast", gb(a["weight_copies"]), gb(b["weight_copies"])],
            ["saved activations", gb(a["activations"]), gb(b["activations"])],
            ["peak", gib(f32["peak_alloc_bytes"]), gib(f16["peak_alloc_bytes"])]]
    return f"""## Mixed precision

**Why keep fp32 master weights?** An update is often smaller than half a unit in the last place
of a 16-bit weight (fp16 has 10 mantissa bits, bf16 7): added to a 16-bit weight it rounds away
and training silently stalls. The optimizer therefore updates fp32 weights and autocast casts
them to 16 bits for each matmul. **Why scale the loss?** fp16 flushes gradients below ~6e-8 to
zero; multiplying the loss by S (and the gradients back by 1/S before the step, skipping steps
whose gradients overflowed) keeps small gradients representable. bf16 has fp32's exponent range
and needs no scaling. Code: `train/precision.py` (one `PrecisionPolicy` per precision);
tests: `tests/train/test_precision.py`.

**Does mixed precision halve memory for LLM fine-tuning?** Not with AMP on a frozen LoRA base:
our Table 2 cell (batch 1, no checkpointing) went from {gib(f32['peak_alloc_bytes'])} in fp32 to
{gib(f16['peak_alloc_bytes'])} with fp16 AMP. AMP keeps the fp32 weights *and* caches a 16-bit
copy of each weight it casts; activations shrink, but they are small next to 7B weights:

{table(["component", "fp32", "fp16 AMP"], rows)}

What does halve the memory is storing the frozen base in 16 bits (pure bf16, adapters in fp32):
the course cell (batch 1 × accumulation 8) peaks at {gib(bf16 and bf16['peak_alloc_bytes'], 2)} in pure bf16 (H200) against
{gib(f32g8 and f32g8['peak_alloc_bytes'])} in fp32 (H100, Table 2).

{source("bench-7b/cells.json and seams-h200/new/course-new/cells.json", f16)}
"""


def kv_cache() -> str:
    gen = read_json("generate-7b-h100/results.json")
    probes = read_json("guide-h200/probes/results.json")
    out = ["## The KV cache", "",
           "**Benefit**: with a cache each new token attends to the stored keys/values of the prefix, so a",
           "decoding step runs the model on one token instead of re-running it on the whole prefix.",
           "**Cost**: 2 (K and V) × layers × batch × positions × KV heads × head dim × bytes, allocated up",
           "front (`model.py` `KVCache`, `Transformer.setup_cache`). Same tokens with and without it:",
           "`tests/test_generate.py`.", ""]
    if gen:
        m = gen["meta"]
        rows = [[r["method"], f"{r['tokens_per_s']:.1f}", f"{r['ratio_vs_solotune_kv']:.2f}"] for r in gen["rows"]]
        out += [f"Batch {m['batch']}, {m['prompt_tokens']}-token prompt + {m['new_tokens']} new tokens, bf16:", "",
                table(["method", "tokens/s", "time vs KV cache"], rows), "",
                "At this size the cache bought nothing measurable (batch-1 decoding reads all 13 GB of bf16",
                "weights per token either way, and a 512-token prefix is cheap next to that); its benefit",
                "should grow with prompt length and batch, which the table below measures.", "",
                f"*Source: `benchmarks/results/generate-7b-h100/results.json`; {m['device']}, {m['date'][:10]}.*", ""]
    if probes is None:
        out += ["Longer prompts and the cache's measured bytes: " + GUIDE_RUN, ""]
    else:
        rows = [[f"{r['batch']}", f"{r['prompt_len']} + {r['new_tokens']}", gib(r["cache_bytes"], 2),
                 gib(r["cache_bytes_formula"], 2), f"{r['kv_s']:.2f} s", f"{r['no_cache_s']:.2f} s",
                 f"{r['no_cache_s'] / r['kv_s']:.1f}×"] for r in probes["kv_cache"]]
        out += [table(["batch", "prompt + new", "cache (measured)", "cache (formula)", "with cache", "without",
                       "speed-up"], rows), "",
                f"*Source: `benchmarks/results/guide-h200/probes/results.json`; {probes['meta']['device']}, "
                f"{probes['meta']['date'][:10]}.*", ""]
    return "\n".join(out)


def quantized() -> str:
    runs = [("nf4-b1", "QLoRA (NF4 + double quantization), batch 1"), ("nf4-b8", "QLoRA, batch 8"),
            ("nf4-b8-offload", "QLoRA + activation offload, batch 8"), ("int8-b8", "int8 base, batch 8")]
    rows, first = [], None
    for rel, name in runs:
        c = (cells(f"qlora-bench-h200/{rel}") or [None])[0]
        first = first or c
        if c is None:
            rows.append([name, GUIDE_RUN, "", ""])
            continue
        pred = (c.get("predicted") or {}).get("peak")
        rows.append([name, gib(c["peak_alloc_bytes"], 2), gib(pred, 2), f"{c['tokens_per_s']:,.0f}"])
    return f"""## QLoRA, int8 bases and offload

**What does a 4-bit base buy?** The frozen weights are stored in NF4 (4 bits + a per-block scale,
the scales themselves quantized: double quantization) and dequantized block by block inside each
matmul; LoRA's adapters stay in 16/32 bits. bf16, checkpointing all, LoRA r16 on `wq,wv`:

{table(["setting", "peak (measured)", "peak (planner)", "tokens/s"], rows)}

Offloading the saved activations to pinned host memory trades PCIe transfers for GPU memory.
{source("qlora-bench-h200/*/cells.json", first)}
Code: `quant/` (`NF4Linear`, `Int8Linear`), `train/offload.py`; tests: `tests/quant/`,
`tests/train/test_quantized_finetune.py`, `tests/train/test_offload.py`.

**Packing** (`--packing on`, `data/packing.py`; packed == padded: `tests/data/test_packing.py`):
no committed result file yet, so no number here. **8-bit and paged optimizers**: not in solotune
yet (they land as `OptimizerSpec` entries, see `docs/architecture.md`).
"""


SECTIONS: tuple[Callable[[], str], ...] = (intro, accumulation, inference, checkpointing, lora, precision,
                                           kv_cache, quantized)


def render() -> str:
    body = "\n".join(s().rstrip() + "\n" for s in SECTIONS)
    return body + "\n---\n*Generated by `benchmarks/render_guide.py` from `benchmarks/results/`; do not edit by hand.*\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/guide.md differs from the render")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not GUIDE.is_file() or GUIDE.read_text(encoding="utf-8") != text:
            print(f"{GUIDE} is stale: run python3 benchmarks/render_guide.py", file=sys.stderr)
            return 1
        return 0
    GUIDE.write_text(text, encoding="utf-8")
    print(f"wrote {GUIDE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
