"""``report.md``, ``cells.csv``, ``cells.json`` and the two figures of a ``solotune bench`` run.

Every statement in the report is computed from the cell results: Table 1's arrows come from
measured deltas between cells that differ in one technique, and the paragraph on fp16 AMP is
assembled from the measured anatomy of such a pair.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .cell import LOOP_OFF
from .plan import GiB

TECHNIQUES = {"ga": "Gradient accumulation", "precision": "Mixed precision", "lora": "LoRA",
              "gc": "Gradient checkpointing", "packing": "Padding-free packing", "compile": "torch.compile",
              "kernels": "Fused kernels"}
SPEED = ("packing", "compile", "kernels")  # solotune loop options: reference cells run them off
OFF = LOOP_OFF  # their off values (cells.json records what the loop ran: "auto" resolved)
THRESHOLD = 0.05  # |relative change| below this is "–"

# (label, measured anatomy key, predicted key) of the components Table 1 compares
COMPONENTS = (
    ("Parameters", "params_total", "params"),
    ("Gradients", "grads_total", "grads"),
    ("Optimizer state", "optimizer_total", "optimizer"),
    ("Activations", "max_activations", "activations"),
    ("Autocast weight copies", "max_weight_copies", "weight_copies"),
    ("Peak memory", "peak", "peak"),
)
PARTS = ("params_total", "grads", "optimizer", "activations", "weight_copies", "rest")
PART_LABELS = {"params_total": "parameters", "grads": "gradients", "optimizer": "optimizer state",
               "activations": "saved activations", "weight_copies": "autocast weight copies", "rest": "rest"}
COLORS = {"params_total": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
          "weight_copies": "#8172b3", "rest": "#bbbbbb"}
CSV_FIELDS = ("cell_id", "impl", "model", "layers", "data", "seq_len", "micro_batch", "grad_accum", "grad_checkpoint",
              "precision", "method", "quantize", "optimizer", "optimizer_in_backward", "offload", "packing", "compile",
              "kernels", "loss", "status", "peak_alloc_bytes", "peak_reserved_bytes", "predicted_peak_bytes",
              "runtime_s", "runtime_extrapolated", "tokens", "tokens_per_s", "steady_tokens_per_s", "warmup_s",
              "compile_s", "mean_loss", "trainable_params", "mfu",
              "anatomy_phase", "anatomy_params", "anatomy_grads", "anatomy_optimizer", "anatomy_activations",
              "anatomy_weight_copies", "anatomy_rest", "oom_request_bytes", "error", "device", "torch", "date", "command")


# ------------------------------------------------------------------------------ file writing
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, results: Sequence[dict[str, Any]]) -> None:
    _atomic_write(Path(path), (json.dumps(list(results), indent=1) + "\n").encode())


def write_csv(path: Path, results: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in results:
        row = dict(r)
        a = r.get("anatomy") or {}
        row["anatomy_phase"] = a.get("phase")
        for k in ("grads", "optimizer", "activations", "weight_copies", "rest"):
            row[f"anatomy_{k}"] = a.get(k)
        row["anatomy_params"] = a.get("params_total")
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    _atomic_write(Path(path), buf.getvalue().encode())


# ------------------------------------------------------------------------------------ helpers
class Units:
    """Byte formatting in one unit for a whole report: GiB for real models, MiB/KiB for toy ones."""

    def __init__(self, largest: float) -> None:
        self.name, self.size = next(((n, b) for n, b in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10))
                                     if largest >= 0.5 * b), ("KiB", 2**10))

    def __call__(self, x: float | None, digits: int = 2) -> str:
        return "–" if x is None else f"{x / self.size:.{digits}f}"

    def signed(self, x: float) -> str:
        return f"{'+' if x >= 0 else '−'}{abs(x) / self.size:.2f}"


def units_for(results: Sequence[dict[str, Any]]) -> Units:
    sizes = [r.get(k) or 0 for r in results for k in ("peak_alloc_bytes", "predicted_peak_bytes")]
    return Units(max(sizes, default=GiB))


def count(n: float) -> str:
    """1.23 B / 4.5 M / 12 K."""
    for div, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def onoff(b: bool) -> str:
    return "on" if b else "off"


def state(r: dict[str, Any]) -> dict[str, bool]:
    """Each technique on/off in cell ``r`` (cells.json written before a field existed: off)."""
    return {"ga": r["grad_accum"] > 1, "gc": r["grad_checkpoint"] != "off", "precision": r["precision"] != "fp32",
            "lora": r["method"] != "full", **{k: r.get(k, OFF[k]) != OFF[k] for k in SPEED}}


def options(r: dict[str, Any]) -> str:
    """The cell's settings beyond the course's four axes, e.g. ``qlora, compile=blocks``."""
    parts = [r["method"]] if r["method"] not in ("lora", "full") else []
    parts += [f"offload {r['offload']}"] if r.get("offload", "none") != "none" else []
    parts += [f"{k}={r[k]}" for k in OFF if r.get(k, OFF[k]) != OFF[k]]
    return ", ".join(parts)


def ref_key(r: dict[str, Any]) -> tuple:
    """What a solotune cell and its reference cells share: not the loop options (solotune's own), nor
    offload or the optimizer (the reference runs without them: ``cell.REFERENCE_NEAREST``)."""
    from .cell import REFERENCE_QUANTIZE

    s, q = state(r), r.get("quantize", "none")
    return (tuple(s[k] for k in ("ga", "precision", "lora", "gc")), q if r.get("impl") != "solotune" else
            REFERENCE_QUANTIZE.get(q, q))


def reference_differs(r: dict[str, Any]) -> list[str]:
    """What a solotune cell uses that its reference ran without, e.g. ``["offload activations"]``."""
    from .cell import REFERENCE_NEAREST, REFERENCE_QUANTIZE

    q = r.get("quantize", "none")
    return [f"{k.replace('_', ' ')} {r[k]}" if not isinstance(v, bool) else k.replace("_", " ")
            for k, v in REFERENCE_NEAREST.items() if r.get(k, v) != v] + (
        [f"quantize {q} (its reference: {'the 16-bit base' if REFERENCE_QUANTIZE[q] == 'none' else REFERENCE_QUANTIZE[q]})"]
        if q in REFERENCE_QUANTIZE else [])


def reference_cells(results: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(impl, ref_key) -> the reference cell; one that ran wins over one that was skipped for another cell."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in results:
        k = (r["impl"], ref_key(r))
        if r["impl"] != "solotune" and (k not in out or out[k]["status"] == "skipped"):
            out[k] = r
    return out


def describe(r: dict[str, Any]) -> str:
    parts = [f"GA {r['grad_accum']}", r["precision"], "LoRA" if r["method"] == "lora" else "full fine-tuning",
             f"checkpointing {r['grad_checkpoint']}"]
    return ", ".join(parts)


def optimizer_label(r: dict[str, Any]) -> str:
    """The cell's optimizer technique, e.g. ``adamw``, ``adamw-8bit + in backward + state offload``."""
    off = str(r.get("offload") or "none").split(",")
    return " + ".join([r.get("optimizer") or "adamw"] + ["in backward"] * bool(r.get("optimizer_in_backward"))
                      + ["state offload"] * ("optimizer" in off))


def label(r: dict[str, Any]) -> str:
    s = state(r)
    flags = [n for n, k in (("GA", "ga"), ("MP", "precision"), ("LoRA", "lora"), ("GC", "gc")) if s[k]]
    base = "+".join(flags) if flags else "none"
    extra = options(r)
    return base + (f" [{extra}]" if extra else "") + ({"hf": " (HF)", "hf-liger": " (HF+Liger)"}.get(r["impl"], ""))


def _key(r: dict[str, Any], skip: str) -> tuple:
    s = state(r)
    return (r["impl"],) + tuple(s[k] for k in TECHNIQUES if k != skip)


def pairs(results: Sequence[dict[str, Any]], tech: str, impl: str = "solotune",
          need_ok: bool = True) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(technique off, technique on) cell pairs that are equal in every other technique."""
    pool = [r for r in results if r["impl"] == impl and (r["status"] == "ok" or not need_ok)]
    offs = {_key(r, tech): r for r in pool if not state(r)[tech]}
    return [(offs[_key(r, tech)], r) for r in pool if state(r)[tech] and _key(r, tech) in offs]


def _measured(r: dict[str, Any], key: str) -> float | None:
    if key == "runtime":
        return r.get("runtime_s")
    a = r.get("anatomy") or {}
    return a.get(key)


def _predicted(r: dict[str, Any], key: str) -> float | None:
    p = r.get("predicted") or {}
    if key == "params":
        return sum((p.get("params") or {}).values()) if p.get("params") else None
    return p.get(key)


def arrow(changes: list[float]) -> str:
    """↑ / ↓ / – from relative changes (median), with the median percentage."""
    if not changes:
        return "n/a"
    finite = [c for c in changes if math.isfinite(c)]
    if not finite:  # from nothing to something
        return "↑ (new)"
    m = statistics.median(finite)
    if m > THRESHOLD:
        return f"↑ +{100 * m:.0f}%"
    if m < -THRESHOLD:
        return f"↓ −{100 * -m:.0f}%"
    return f"– ({100 * m:+.0f}%)"


def _rel(a: float | None, b: float | None) -> float | None:
    """Relative change a -> b; None when unknown or when both are zero (the pair says nothing)."""
    if a is None or b is None or (a == 0 and b == 0):
        return None
    if a == 0:
        return math.inf
    return b / a - 1.0


def table1(results: Sequence[dict[str, Any]], techniques: Iterable[str]) -> list[str]:
    """Table 1: does each technique raise or lower each component? From measured deltas between
    cells that differ only in that technique (solotune cells); where no such pair ran, from the
    planner's predictions (marked ᵖ)."""
    cols = [c[0] for c in COMPONENTS] + ["Computation (runtime)"]
    lines = ["| Technique | " + " | ".join(cols) + " | pairs |", "|---" * (len(cols) + 2) + "|"]
    for tech in techniques:
        ok_pairs = pairs(results, tech)
        cells = []
        for _, mkey, pkey in COMPONENTS:
            vals = [(_measured(off, mkey), _measured(on, mkey)) for off, on in ok_pairs]
            ch = [c for a, b in vals if (c := _rel(a, b)) is not None]
            if ch:
                cells.append(arrow(ch))
                continue
            if vals and all(a == b == 0 for a, b in vals):
                cells.append("– (none)")
                continue
            pp = pairs(results, tech, need_ok=False)
            ch = [c for off, on in pp if (c := _rel(_predicted(off, pkey), _predicted(on, pkey))) is not None]
            cells.append(arrow(ch) + " ᵖ" if ch else "n/a")
        ch = [c for off, on in ok_pairs if (c := _rel(off.get("runtime_s"), on.get("runtime_s"))) is not None]
        cells.append(arrow(ch))
        lines.append(f"| {TECHNIQUES[tech]} | " + " | ".join(cells) + f" | {len(ok_pairs)} |")
    return lines


# ------------------------------------------------------------------------------ AMP paragraph
def explain_amp(results: Sequence[dict[str, Any]], precision_on: str, u: Units) -> list[str]:
    """Why did mixed precision move the peak? Assembled from a measured pair's anatomy."""
    cands = [(a, b) for a, b in pairs(results, "precision") if b["precision"] == precision_on
             and (a.get("anatomy") or {}).get("phase") == "forward/backward"
             and (b.get("anatomy") or {}).get("phase") == "forward/backward"]
    if not cands:
        return [f"No pair of cells that differ only in precision (fp32 vs {precision_on}) ran to completion, "
                "so there is nothing to explain from measurements."]
    # Prefer the course's case: LoRA, no accumulation, no checkpointing.
    cands.sort(key=lambda p: (p[0]["method"] != "lora", p[0]["grad_checkpoint"] != "off", p[0]["grad_accum"] != 1))
    off, on = cands[0]
    a, b = off["anatomy"], on["anatomy"]
    d = {k: b[k] - a[k] for k in PARTS}
    dpeak = b["peak"] - a["peak"]
    verb = "barely changed" if abs(dpeak) < 0.01 * a["peak"] else "raised" if dpeak > 0 else "lowered"
    lines = [f"Cells compared: {describe(off)} vs the same with {precision_on} (solotune). "
             f"Turning {precision_on} on **{verb}** the peak from {u(a['peak'])} to {u(b['peak'])} {u.name} "
             f"({u.signed(dpeak)} {u.name}, {100 * dpeak / a['peak']:+.0f}%). Component by component (at the peak):", ""]
    lines.append("| component | fp32 | " + precision_on + " | change |")
    lines.append("|---|---:|---:|---:|")
    for k in PARTS:
        lines.append(f"| {PART_LABELS[k]} | {u(a[k])} | {u(b[k])} | {u.signed(d[k])} |")
    lines.append(f"| **peak** | {u(a['peak'])} | {u(b['peak'])} | {u.signed(dpeak)} |")
    lines.append("")
    bullets = []
    if abs(d["params_total"]) < 0.01 * a["params_total"]:
        bullets.append(f"- Parameters stay at {u(a['params_total'])} {u.name}: autocast computes in 16 bits but "
                       "keeps the fp32 weights, so AMP saves nothing there.")
    else:
        bullets.append(f"- Parameters change by {u.signed(d['params_total'])} {u.name} (the weights are stored in a different dtype).")
    if d["weight_copies"] > 0:
        n_w = d["weight_copies"] / 2
        bullets.append(
            f"- Autocast weight copies appear: {u(b['weight_copies'])} {u.name} (about {count(n_w)} weights × 2 bytes). "
            "Every matmul under autocast runs on a 16-bit copy of its fp32 weight, and autograd keeps that copy "
            "to compute the gradient of the matmul's input. "
            + ("With LoRA the base weights are frozen, so the copy is not cached but made afresh for each matmul, "
               "and every one of them is held until backward reaches that layer."
               if off["method"] == "lora" else "Trainable weights' copies live in autocast's cache and are kept by backward."))
    if d["activations"] < 0:
        frac = b["activations"] / a["activations"] if a["activations"] else 0.0
        bullets.append(
            f"- Saved activations shrink by {u.signed(d['activations'])[1:]} {u.name} ({u(a['activations'])} → "
            f"{u(b['activations'])} {u.name}, {100 * frac:.0f}% of fp32): matmul inputs and attention tensors are stored "
            "in 16 bits" + (", but the residual stream, RMSNorm's statistics and the log-softmax of the logits stay fp32, "
                           "and autocast stores a separate 16-bit copy of each normed input for every matmul that reads "
                           "it (Q, K, V; W1, W3)" if frac > 0.55 else "") + ".")
    elif d["activations"] > 0:
        bullets.append(f"- Saved activations grow by {u.signed(d['activations'])} {u.name}: the 16-bit copies autocast makes of "
                       "matmul inputs come on top of the fp32 tensors the model keeps anyway.")
    ap, bp = (off.get("predicted") or {}).get("activations_by_part"), (on.get("predicted") or {}).get("activations_by_part")
    if ap and bp:
        ch = sorted(((bp.get(k, 0) - ap.get(k, 0), k) for k in set(ap) | set(bp)), key=lambda t: t[0])
        txt = ", ".join(f"{k} {u.signed(v)}" for v, k in ch if abs(v) > 0)
        if txt:
            bullets.append(f"  (planner's breakdown of that change, {u.name}: {txt}.)")
    bullets.append(f"- The rest (logits, loss gradients, temporaries) changes by {u.signed(d['rest'])} {u.name}.")
    gain = d["weight_copies"]
    save = -min(d["activations"], 0)
    if dpeak > 0 and gain > save:
        bullets.append(f"- Net: the weight copies (+{gain / u.size:.2f} {u.name}) outweigh what 16-bit activations save "
                       f"({save / u.size:.2f} {u.name}). AMP pays off when the fp32 weights it keeps are a small part of "
                       "the memory (long sequences, big batches) or when the weights themselves are stored in 16 bits "
                       "(pure bf16).")
    elif dpeak <= 0:
        bullets.append(f"- Net: the activation savings ({save / u.size:.2f} {u.name}) exceed the weight copies ({gain / u.size:.2f} {u.name}).")
    lines.extend(bullets)
    hf = [(x, y) for x, y in pairs(results, "precision", impl="hf") if y["precision"] == precision_on
          and _key(x, "precision") == ("hf",) + _key(off, "precision")[1:]]
    if hf:
        x, y = hf[0]
        lines.append("")
        lines.append(f"HF transformers + peft, same cells: {u(x['peak_alloc_bytes'])} → {u(y['peak_alloc_bytes'])} {u.name} "
                     f"({u.signed(y['peak_alloc_bytes'] - x['peak_alloc_bytes'])} {u.name}); autocast weight copies "
                     f"{u((y.get('anatomy') or {}).get('weight_copies'))} {u.name} there.")
    lines.append("")
    lines.append("For reference, the course reports measured 30.2 → 41.1 GiB for this step with HF PEFT on LLaMA-2-7B.")
    return lines


# ----------------------------------------------------------------------------------- figures
def plot_anatomy(results: Sequence[dict[str, Any]], path: Path, u: Units) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in results if r["status"] in ("ok", "oom") and (r["status"] == "ok" or r.get("predicted"))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cells) + 2), 5.0))
    labelled: set[str] = set()

    def once(name: str) -> str | None:  # each legend entry once, whichever cell comes first
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for i, r in enumerate(cells):
        if r["status"] == "ok" and r.get("anatomy"):
            a, bottom = r["anatomy"], 0.0
            for k in PARTS:
                v = max(a.get(k) or 0, 0) / u.size
                ax.bar(i, v, bottom=bottom, color=COLORS[k], label=once(PART_LABELS[k]))
                bottom += v
        else:  # OOM: the planner's prediction, hatched
            bottom = 0.0
            for k, pk in (("params_total", "params"), ("grads", "grads"), ("optimizer", "optimizer"),
                          ("activations", "activations"), ("weight_copies", "weight_copies")):
                v = (_predicted(r, pk) or 0) / u.size
                ax.bar(i, v, bottom=bottom, color=COLORS[k], alpha=0.35, hatch="//", edgecolor="grey",
                       label=once("OOM: predicted components"))
                bottom += v
            ax.text(i, bottom, "OOM", ha="center", va="bottom", fontsize=7, rotation=90)
        if r.get("predicted_peak_bytes") and r["status"] == "ok":
            ax.plot([i - 0.4, i + 0.4], [r["predicted_peak_bytes"] / u.size] * 2, color="black", lw=1.2,
                    label=once("predicted peak"))
    mem = next((r.get("device_memory_bytes") for r in cells if r.get("device_memory_bytes")), None)
    if mem:
        ax.axhline(mem / u.size, color="red", lw=0.8, ls="--", label=once("device memory"))
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([label(r) for r in cells], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"{u.name} at the peak")
    ax.set_title("Memory anatomy per cell (hatched: OOM, planner's prediction)", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_memory_runtime(results: Sequence[dict[str, Any]], path: Path, u: Units) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for impl, marker, color in (("solotune", "o", "#4c72b0"), ("hf", "^", "#dd8452")):
        pts = [r for r in results if r["impl"] == impl and r["status"] == "ok" and r.get("runtime_s")]
        if not pts:
            continue
        ax.scatter([r["runtime_s"] for r in pts], [r["peak_alloc_bytes"] / u.size for r in pts], marker=marker,
                   color=color, label="solotune" if impl == "solotune" else "HF transformers + peft")
        for r in pts if impl == "solotune" else []:  # HF points sit next to theirs: one label each
            ax.annotate(label(r), (r["runtime_s"], r["peak_alloc_bytes"] / u.size), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("runtime for the samples (s)")
    ax.set_ylabel(f"peak memory ({u.name})")
    ax.set_title("Peak memory vs runtime (ok cells)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    _atomic_write(Path(path), buf.getvalue())


# ------------------------------------------------------------------------------------ report
def _status_cell(r: dict[str, Any] | None, u: Units) -> tuple[str, str]:
    """(peak, runtime) strings of a Table 2 cell."""
    if r is None:
        return "", ""
    if r["status"] == "ok":
        rt = f"{r['runtime_s']:.1f}" + ("*" if r.get("runtime_extrapolated") else "")
        return u(r["peak_alloc_bytes"]), rt
    if r["status"] == "oom":
        pred = r.get("predicted_peak_bytes")
        return (f"OOM (needs {u(pred, 1)})" if pred else "OOM"), "–"
    return r["status"], "–"


def write_report(out: Path, results: Sequence[dict[str, Any]], bc: Any) -> Path:
    """Write report.md, cells.json, cells.csv, anatomy.png and memory_runtime.png under ``out``."""
    out = Path(out)
    write_json(out / "cells.json", results)
    write_csv(out / "cells.csv", results)
    results = sorted(results, key=table_order)
    u = units_for(results)
    plot_anatomy(results, out / "anatomy.png", u)
    plot_memory_runtime(results, out / "memory_runtime.png", u)
    _atomic_write(out / "report.md", render(results, bc).encode())
    return out / "report.md"


def table_order(r: dict[str, Any]) -> tuple:
    """Rows in the course's column order: GA, mixed precision, LoRA, then checkpointing (off first)."""
    s = state(r)
    return (s["ga"], s["precision"], s["lora"], s["gc"], *(s[k] for k in SPEED), r["impl"] != "solotune", r["impl"])


def speed_table(results: Sequence[dict[str, Any]], ref_cells: dict[tuple, dict[str, Any]], u: Units) -> list[str]:
    """Steady-state tokens/s (after the warm-up steps) of every cell, against the references."""
    L = ["## Speed: steady state", "",
         "tokens/s over the optimizer steps after the first `warmup_steps` (the warm-up: CUDA start-up, autotuning, "
         "compilation; `compile` = what the warm-up took beyond the steady time per step, compiled cells only). "
         "vs HF / vs HF+Liger: steady tokens/s over the reference's.", "",
         f"| cell | impl | micro-batch × seq_len | status | tokens/s steady | warm-up (s, steps) | compile (s) | "
         f"peak ({u.name}) | vs HF | vs HF+Liger |",
         "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tps = r.get("steady_tokens_per_s")
        ratios = []
        for ref in ("hf", "hf-liger"):
            h = ref_cells.get((ref, ref_key(r)))
            ht = h.get("steady_tokens_per_s") if h else None
            ratios.append(f"{tps / ht:.2f}×" if r["impl"] == "solotune" and tps and ht else "–")
        warm = f"{r['warmup_s']:.1f} ({r.get('warmup_steps')})" if r.get("warmup_s") is not None else "–"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "–"
        L.append(f"| {label(r)} | {r['impl']} | {r.get('micro_batch')} × {r.get('seq_len')} | {r['status']} | "
                 f"{f'{tps:,.0f}' if tps else '–'} | {warm} | {comp} | {u(r.get('peak_alloc_bytes'))} | "
                 f"{ratios[0]} | {ratios[1]} |")
    L.append("")
    return L


def render(results: Sequence[dict[str, Any]], bc: Any) -> str:
    u = units_for(results)
    results = sorted(results, key=table_order)
    sol = [r for r in results if r["impl"] == "solotune"]
    refs = [i for i in ("hf", "hf-liger") if any(r["impl"] == i for r in results)]
    ref_cells = reference_cells(results)
    first = next((r for r in results if r.get("device")), results[0] if results else {})
    mm = (getattr(bc, "extra", {}) or {}).get("matmul") or {}
    L: list[str] = []
    layers = next((r["layers"] for r in sol if r.get("layers")), bc.layers)
    L.append(f"# solotune bench: {bc.model} ({layers} layer{'' if layers == 1 else 's'})")
    L.append("")
    L.append(f"- Command: `{bc.command}`")
    L.append(f"- Device: {first.get('device')}; torch {first.get('torch')}; {first.get('date')}"
             + (f"; measured bf16 matmul rate {mm['matmul_tflops']:.0f} TFLOP/s" if mm.get("matmul_tflops") else ""))
    weights = next((r.get("weights") for r in sol if r.get("weights")), "random init")
    if getattr(bc, "data", "alpaca-sample") == "random":
        data = (f"Data: {bc.samples} rows of exactly {bc.seq_len} random tokens (seeded, `--data random`), every "
                "position a target; the same rows for every implementation.")
    else:
        data = (f"Data: Alpaca records 0–{bc.samples - 1} (bundled sample), prompt template + masked labels, cut at "
                f"{bc.seq_len} tokens; longest sample "
                f"{next((r.get('max_seq_len_data') for r in sol if r.get('max_seq_len_data')), '?')} tokens.")
    L.append(f"- Model: {bc.model}, {layers} layer{'' if layers == 1 else 's'}, **{weights}** weights (memory and speed "
             f"do not depend on the values). {data}")
    L.append(f"- Course hyperparameters: micro-batch {bc.micro_batch}, accumulation {bc.ga_on} when on, checkpointing "
             f"`{bc.gc_on}` when on, mixed precision = `{bc.precision_on}` when on (fp32 when off), LoRA r={bc.lora_rank} "
             f"α={bc.lora_alpha:g} dropout {bc.lora_dropout:g} on {','.join(bc.lora_targets)} (full fine-tuning when off), "
             f"AdamW lr {bc.lr:g}.")
    if any(r.get("sdpa") == "no-cudnn" for r in results):
        L.append("- Attention: flash / memory-efficient SDPA kernels (cuDNN attention off: it builds a new execution "
                 "plan for every new sequence length, and at one example per micro-batch nearly every step has one).")
    kinds = sorted({r.get("peak_kind") for r in results if r.get("peak_kind")})
    L.append(f"- Peak memory: {', '.join(kinds) or 'n/a'} (tensors; the allocator's reserve is in cells.csv). Each cell ran "
             "in its own process.")
    if bc.time_budget_s and any(r.get("runtime_extrapolated") for r in results):
        L.append(f"- \\* Runtime extrapolated: the cell stopped after the optimizer step that crossed the "
                 f"{bc.time_budget_s:g} s budget (never before step 2); step 1 (warm-up) counts as measured and the "
                 "later steps' time per token is scaled to all the tokens of the samples. The longest example was "
                 "moved to step 2 so the peak still includes it.")
    L.append("")

    # ---- Table 2
    L.append("## Table 2: peak memory and runtime")
    L.append("")
    L.append(f"Runtime: wall time of the training loop over the {bc.samples} samples (s). Memory in {u.name}. "
             "OOM cells show the planner's predicted requirement.")
    L.append("")
    head = (f"| Gradient accumulation | Mixed precision | LoRA | Gradient checkpointing | options | Peak memory ({u.name}) "
            f"| Runtime (s) | Predicted ({u.name}) |")
    sep = "|---|---|---|---|---|---:|---:|---:|"
    techniques = any(optimizer_label(r) != "adamw" for r in sol)  # a column only when a cell uses another
    if techniques:
        head, sep = head + " Optimizer |", sep + "---|"
    names = {"hf": "HF", "hf-liger": "HF+Liger"}
    for ref in refs:
        head += f" {names[ref]} peak ({u.name}) | {names[ref]} runtime (s) | memory ratio | speed-up |"
        sep += "---:|---:|---:|---:|"
    L += [head, sep]
    for r in sol:
        s = state(r)
        peak, rt = _status_cell(r, u)
        row = (f"| {onoff(s['ga'])} | {onoff(s['precision'])} | {onoff(s['lora'])} | {onoff(s['gc'])} | {options(r)} | "
               f"{peak} | {rt} | {u(r.get('predicted_peak_bytes'))} |" + (f" {optimizer_label(r)} |" if techniques else ""))
        for ref in refs:
            h = ref_cells.get((ref, ref_key(r)))
            hp, hr = _status_cell(h, u)
            ratio = speed = "–"
            if h and h["status"] == "ok" and r["status"] == "ok":
                ratio = f"{r['peak_alloc_bytes'] / h['peak_alloc_bytes']:.2f}"
                speed = f"{h['runtime_s'] / r['runtime_s']:.2f}×"
            row += f" {hp} | {hr} | {ratio} | {speed} |"
        L.append(row)
    if refs:
        L.append("")
        L.append("memory ratio = solotune peak / reference peak; speed-up = reference runtime / solotune runtime. "
                 "`skipped` reference cells were not run: the solotune cell did not fit, HF cannot run its configuration (a checkpointing policy, int8), or a "
                 "package is missing (the per-cell details say which).")
        differs = sorted({d for r in sol for d in reference_differs(r)})
        if differs:
            L.append("")
            L.append(f"The reference cells ran without {', '.join(differs)} (HF has no equivalent): each is compared "
                     "with the nearest configuration it has.")
    L.append("")
    L += speed_table(results, ref_cells, u)

    # ---- Table 1
    L.append("## Table 1: what each technique does (derived from the measurements)")
    L.append("")
    L.append(f"Median relative change over pairs of solotune cells that differ only in that technique "
             f"(↑ / ↓ beyond ±{THRESHOLD * 100:.0f}%, – within). Components as measured (gradients and optimizer "
             "state: their full size; activations and weight copies: the largest micro-batch). "
             "ᵖ: no such pair ran, so the arrow comes from the planner's predictions for the cells.")
    L.append("")
    L += table1(results, [t for t in TECHNIQUES if t in bc.axes])
    L.append("")

    # ---- anatomy
    L.append(f"## Memory anatomy at the peak ({u.name})")
    L.append("")
    L.append("Measured: parameters, gradients and optimizer state from the live tensors; saved activations through "
             "`torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters excluded); autocast weight "
             "copies = saved 16-bit copies of weights; rest = peak − the others (logits, loss gradients, "
             "recomputation, temporaries, allocator rounding). `phase` is where the peak happened; gradients are "
             "those alive then (with accumulation, the window's so far). autocast cache = 16-bit copies of "
             "trainable fp32 weights held during the forward (part of weight copies when backward keeps them, of "
             "rest otherwise).")
    L.append("")
    L.append("| cell | impl | phase | parameters | gradients | optimizer | activations | weight copies | rest | peak | autocast cache |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        a = r.get("anatomy")
        if r["status"] != "ok" or not a:
            continue
        L.append(f"| {label(r)} | {r['impl']} | {a['phase']} | {u(a['params_total'])} | {u(a['grads'])} | "
                 f"{u(a['optimizer'])} | {u(a['activations'])} | {u(a['weight_copies'])} | {u(a['rest'])} | "
                 f"{u(a['peak'])} | {u(a.get('autocast_cache'))} |")
    L.append("")
    L.append("![anatomy](anatomy.png)")
    L.append("")

    # ---- predicted vs measured
    L.append("## Predicted vs measured (solotune cells)")
    L.append("")
    L.append("Planner (`solotune plan`) for the longest micro-batch the cell ran. Parameters, gradients, optimizer state, "
             "saved activations and weight copies are formulas of the model; the peak adds a model of the transients.")
    L.append("")
    L.append("| cell | status | predicted peak | measured peak | error | pred. activations | meas. activations | "
             "pred. weight copies | meas. weight copies |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    errs = []
    for r in sol:
        p = r.get("predicted") or {}
        a = r.get("anatomy") or {}
        err = "–"
        if r["status"] == "ok" and r.get("predicted_peak_bytes") and r.get("peak_alloc_bytes"):
            e = r["predicted_peak_bytes"] / r["peak_alloc_bytes"] - 1
            errs.append(abs(e))
            err = f"{100 * e:+.1f}%"
        ok = r["status"] == "ok"  # an OOM cell's partial anatomy is not comparable
        L.append(f"| {label(r)} | {r['status']} | {u(r.get('predicted_peak_bytes'))} | "
                 f"{u(r.get('peak_alloc_bytes')) + ('' if ok else ' (at OOM)')} | {err} | {u(p.get('activations'))} | "
                 f"{u(a.get('max_activations') if ok else None)} | {u(p.get('weight_copies'))} | "
                 f"{u(a.get('max_weight_copies') if ok else None)} |")
    if errs:
        L.append("")
        L.append(f"Largest |error| over cells that ran: {100 * max(errs):.1f}% ({len(errs)} cells).")
    L.append("")

    # ---- AMP
    L.append(f"## Why {bc.precision_on} with fp32 weights moves the peak")
    L.append("")
    if "precision" in bc.axes:
        L += explain_amp(results, bc.precision_on, u)
    else:
        L.append("(precision was not an axis of this run)")
    L.append("")

    # ---- details
    L.append("## Per-cell details")
    L.append("")
    L.append(f"| cell | impl | status | tokens | tokens/s | MFU | mean loss | trainable params | steps | reserved ({u.name}) | note |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "–"
        loss = f"{r['mean_loss']:.3f}" if r.get("mean_loss") is not None else "–"
        tp = f"{r['trainable_params']:,}" if r.get("trainable_params") else "–"
        note = (r.get("error") or "").replace("|", "/")[:160]
        L.append(f"| {label(r)} | {r['impl']} | {r['status']} | {r.get('tokens') or '–'} | {tps} | {mfu} | {loss} | {tp} | "
                 f"{r.get('steps') or '–'} | {u(r.get('peak_reserved_bytes'))} | {note} |")
    L.append("")
    L.append("MFU: model FLOPs (forward 2·N + backward 2·N through every matmul + 2·N_trainable for weight gradients, "
             "plus causal attention; recomputation not counted) / runtime / the measured bf16 matmul rate.")
    L.append("")
    L.append("![memory vs runtime](memory_runtime.png)")
    L.append("")
    L.append("Files: `cells.json` (every field of every cell), `cells.csv`, `bench.log` (raw log of every cell).")
    return "\n".join(L) + "\n"


def write_longest(path: Path, m: dict[str, Any]) -> None:
    """``max_seq_len.md``: the planner's longest row against the probes of ``bench --find-max-seq-len``."""
    gib = Units(GiB)
    limit = m["memory_limit_bytes"]
    L = [f"# Longest trainable row: {m['model']} {m['method']} ({m['precision']}, checkpointing {m['grad_checkpoint']}"
         + (f", offload {m['offload']}" if m.get("offload", "none") != "none" else "") + f") in {gib(limit)} GiB", "",
         f"- Command: `{m['command']}`; device {m.get('device')}",
         f"- Planner (`solotune plan --max-seq-len`, steps of {m['step']}): longest {m['predicted_longest']} tokens "
         f"(peak {gib(m['predicted_peak_at_longest'])} GiB); {m['predicted_first_over']} does not fit.",
         f"- Measured (micro-batch 1, random rows, {m.get('probe_samples', 2)} optimizer step(s) per probe, the process "
         f"capped with `set_per_process_memory_fraction`): longest that trained **{m['longest_fit']}**, shortest out "
         f"of memory **{m['shortest_oom']}**.", "",
         "| probe | seq_len | status | peak (GiB) | predicted (GiB) | reserved (GiB) | tokens/s |",
         "|---:|---:|---|---:|---:|---:|---:|"]
    for i, p in enumerate(m["probes"], 1):
        tps = p.get("steady_tokens_per_s")
        L.append(f"| {i} | {p['seq_len']} | {p['status']} | {gib(p.get('peak_alloc_bytes'))} | "
                 f"{gib(p.get('predicted_peak_bytes'))} | {gib(p.get('peak_reserved_bytes'))} | "
                 f"{f'{tps:,.0f}' if tps else '–'} |")
    _atomic_write(Path(path), ("\n".join(L) + "\n").encode())
