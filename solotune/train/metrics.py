"""What a run reports: peak memory, the per-step metrics JSONL (and, with ``--tensorboard DIR``, the
same scalars as TensorBoard events), the progress bar, the loss-curve PNG and the final summary."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from ..checkpoint.common import atomic_file
from ..errors import ConfigError

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOSS_PNG = "loss.png"


# ------------------------------------------------------------------------------------ memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: ``max_memory_allocated`` since the last reset (tensors only, not the allocator's cache).
    CPU: the process's peak resident set size (everything the process ever touched, model loading
    included: an upper bound, not a tensor count)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows: no `resource`
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------- metrics.jsonl
class MetricsLog:
    """``OUTPUT_DIR/metrics.jsonl``: one JSON object per optimizer step, flushed as it is written.

    A fresh run starts an empty file; a resumed run keeps the lines up to its checkpoint's step
    (dropping any logged after it by the interrupted run) and appends from there. Resuming into
    another output directory starts from the ``earlier`` run's file (the checkpoint's run).

    ``tensorboard``: a log dir that also gets every record's scalars (:func:`tensorboard_scalars`),
    flushed per step so a run can be watched live; a resumed run purges the events the interrupted
    run wrote after the checkpoint, as the JSONL drops those lines.
    """

    def __init__(self, output_dir: Path, resume_step: int | None, earlier: Path | None = None,
                 tensorboard: str | Path | None = None) -> None:
        self._tb = None
        if tensorboard is not None:
            self._tb = require_tensorboard()(log_dir=str(tensorboard),
                                             purge_step=None if resume_step is None else resume_step + 1)
        self.path = output_dir / METRICS
        self.records: list[dict[str, Any]] = []
        source = self.path if self.path.is_file() else earlier
        if resume_step is not None and source is not None and source.is_file():
            for line in source.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._f = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for tag, value in tensorboard_scalars(record).items():
                self._tb.add_scalar(tag, value, global_step=int(record["step"]))
            self._tb.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how to get it (``tensorboard``
    is an optional dependency; torch's writer imports it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the optional 'tensorboard' package (pip install tensorboard)") from None
    return SummaryWriter


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of one metrics.jsonl record, by their JSONL names (``step`` is the x axis;
    booleans such as ``skipped`` as 0/1; absent values such as a step without ``val_loss`` left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar (loss, tok/s, lr, peak memory) or, with ``enabled=False``, a log line every
    ``log_every`` steps."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int) -> None:
        self.enabled, self.log_every = enabled, log_every
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", desc="finetune", dynamic_ncols=True)

    def update(self, rec: dict[str, Any]) -> None:
        text = (f"loss={rec['loss']:.4f} avg5={rec['loss_avg5']:.4f} tok/s={rec['tokens_per_s']:.0f} "
                f"lr={rec['lr']:.2e} mem={fmt_bytes(rec['peak_mem'])}"
                + (" SKIPPED" if rec.get("skipped") else "")
                + (f" val_loss={rec['val_loss']:.4f}" if rec.get("val_loss") is not None else ""))
        if rec.get("val_loss") is not None and self.bar is not None:
            self.bar.write(f"step {rec['step']}: val loss {rec['val_loss']:.4f}")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif rec["step"] % self.log_every == 0:
            print(f"step {rec['step']}: {text}", flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------- loss PNG
def plot_loss(records: Iterable[dict[str, Any]], path: Path, val_before: float | None = None,
              val_after: float | None = None, title: str = "") -> Path:
    """Training loss per optimizer step, with validation loss before/after as markers (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    recs = [r for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
    steps = [r["step"] for r in recs]
    losses = [r["loss"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, marker=".", lw=0.8, alpha=0.5, label="train loss (per step)")
    if len(losses) >= 4:  # each step sees new examples: the per-step loss is mostly batch-to-batch noise
        ax.plot(steps, running_mean(losses, 5), lw=2, color="C0", label="train loss (mean of last 5 steps)")
    last = steps[-1] if steps else 1
    # Validation curve: before (step 0), every eval_every steps, after (last step).
    val = [(0, val_before)] if val_before is not None else []
    val += [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    val += [(last, val_after)] if val_after is not None else []
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], marker="s", color="C3", lw=1.5, zorder=3,
                label="val loss" + (f" ({val[0][1]:.3f} -> {val[-1][1]:.3f})" if len(val) > 1 else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def running_mean(xs: list[float], k: int) -> list[float]:
    """Mean of the last ``k`` values at each position (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


# ----------------------------------------------------------------------------------- summary
def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable end-of-run summary."""

    def f(x: Any, spec: str = ".4f") -> str:
        return "n/a" if x is None else format(x, spec)

    ppl_b = math.exp(s["val_loss_before"]) if s.get("val_loss_before") is not None else None
    ppl_a = math.exp(s["val_loss"]) if s.get("val_loss") is not None else None
    lines = [
        "── solotune finetune summary " + "─" * 40,
        f"model            {s['model']}  ({s['mode']}, {s['precision']}, grad checkpointing {s['grad_checkpoint']})",
        f"trainable params {s['trainable_params']:,} || all params {s['total_params']:,} || "
        f"trainable% {100 * s['trainable_params'] / max(s['total_params'], 1):.4f}",
        f"steps            {s['steps']}  ({s['tokens']:,} tokens, {s['target_tokens']:,} target tokens, "
        f"{s['skipped_steps']} skipped)",
        f"train loss       first {f(s.get('first_loss'))}  last {f(s.get('final_loss'))}  average {f(s.get('avg_loss'))}"
        "  (per step: each step sees new examples)",
        f"val loss         before {f(s.get('val_loss_before'))} (ppl {f(ppl_b, '.2f')})  "
        f"after {f(s.get('val_loss'))} (ppl {f(ppl_a, '.2f')})"
        + (f"  [{' -> '.join(f'{v:.3f}' for v in s['val_curve'])}]" if len(s.get("val_curve") or []) > 2 else ""),
        f"peak memory      {fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']})",
        f"runtime          {s['runtime_s']:.1f} s training ({s['tokens_per_s']:.0f} tokens/s), "
        f"{s['total_runtime_s']:.1f} s wall in this process (load, validation, saving included)",
        f"output           {s['output_dir']}",
    ]
    if s.get("final_dir") and str(s.get("mode", "")).startswith("LoRA"):  # compare needs an adapter
        lines.append(f"did it help?     solotune compare --adapter {s['output_dir']}   "
                     "(base vs tuned answers and val loss, side by side -> compare.md)")
    return "\n".join(lines)
