"""The one training loop: LoRA and full fine-tuning, every precision, gradient accumulation and
checkpointing policy, resume and Ctrl-C, all through :func:`finetune`.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` examples (the "window"). The loss
is the mean next-token cross-entropy over the *target* tokens of the whole window: each micro-batch
contributes ``sum of its token losses / target tokens in the window``, so k micro-batches of one
example give exactly the gradient of one batch of k examples (plain per-micro-batch means would
weight a short answer's tokens more than a long one's).

Reading order: :func:`finetune` (set-up, evaluation, the loop, saving) -> ``loss.py``
(the loss) -> ``optim.py`` / :func:`make_schedule` -> :class:`DataStream` (order and resume
position). What gets written: ``state.py`` (checkpoints), ``weights.py`` (final/, adapters),
``metrics.py`` (metrics.jsonl, loss.png, summary).

The same loop runs on N processes under ``torchrun`` (``distributed="fsdp"``): whatever differs is
asked of the parallel context ``par`` (``solotune/dist``; one process: no-ops). ``batch_size`` is
then the global micro-batch, each rank computes its share, and token counts and losses are summed
over ranks, so the curve is the single-process one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Example, Record, collate, epoch_order, format_prompt
from ..dist import make_parallel
from ..peft import apply_lora, count_parameters, trainable_summary
from .config import TRAJECTORY_FIELDS, TrainConfig
from .inputs import check_data, load_data
from .metrics import (
    LOSS_PNG, METRICS, SUMMARY, MetricsLog, Progress, format_summary, peak_memory_bytes, plot_loss, reset_peak_memory,
    write_json,
)
from .loss import token_loss_sum
from .optim import make_optimizer
from .precision import PrecisionPolicy, get_policy
from .weights import FINAL
from .state import CHECKPOINTS, capture_rng, list_checkpoints, load_checkpoint


# Fixed prompts for the before/after generations (none of them is in the default train split).
SAMPLE_PROMPTS: tuple[Record, ...] = (
    Record(instruction="Name three primary colors.", output=""),
    Record(instruction="Rewrite the sentence in the passive voice.", input="The cat chased the mouse.", output=""),
    Record(instruction="Explain what a neural network is in one sentence.", output=""),
)


class Instrument(Protocol):
    """Hooks for measurement code (``solotune bench``); every method is optional.

    forward_context(): a context manager entered around each micro-batch's forward + loss + backward
        (e.g. ``torch.autograd.graph.saved_tensors_hooks`` to account activation memory).
    before_step(model, optimizer, step): after the window's last backward, before unscaling,
        clipping and ``optimizer.step`` (the gradients are complete, and still loss-scaled under fp16-amp).
    after_step(model, optimizer, step): after the update, the zeroing of the gradients and the
        bookkeeping of optimizer step ``step`` (1-based). Raising KeyboardInterrupt here behaves
        exactly like Ctrl-C after that step.
    """


@dataclass
class TrainResult:
    final_loss: float | None  # training loss of the last optimizer step
    val_loss: float | None  # after training
    val_loss_before: float | None
    peak_memory_bytes: int  # CUDA max_memory_allocated during training, or the process's peak RSS on CPU
    output_dir: Path
    steps: int
    tokens: int  # non-padding tokens processed (inputs), all steps, resumed ones included
    target_tokens: int  # tokens the loss was computed on
    runtime_s: float  # training loop wall time (without evaluation and generation)
    tokens_per_s: float
    trainable_params: int
    total_params: int
    skipped_steps: int  # fp16-amp steps skipped by the loss scaler
    avg_loss: float | None = None  # mean of the per-step training losses
    first_loss: float | None = None
    val_curve: list[float] = field(default_factory=list)  # before, every eval_every steps, after
    losses: list[float] = field(default_factory=list)
    final_dir: Path | None = None
    last_checkpoint: Path | None = None
    generations_before: list[str] = field(default_factory=list)
    generations_after: list[str] = field(default_factory=list)
    resumed_from: Path | None = None
    world_size: int = 1  # processes that trained (distributed="fsdp"); tokens and tokens_per_s are totals
    peak_memory_bytes_per_rank: list[int] = field(default_factory=list)  # peak_memory_bytes is their max

    @property
    def val_perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(self.val_loss)


# ================================================================================== the loop
def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, SDPA without cuDNN attention: cuDNN builds a new execution plan for every new sequence
    length, and with dynamic padding at batch 1 nearly every step has one (measured on an H100 with
    torch 2.11: 13.1 s instead of 2.25 s for one 7B cell). Flash / memory-efficient kernels don't."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def finetune(cfg: TrainConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
             instrument: Instrument | Any = None) -> TrainResult:
    """Fine-tune per ``cfg``; write metrics, checkpoints, ``final/`` and the summary to ``cfg.output_dir``.

    ``model``/``tokenizer``: use these instead of loading ``cfg.model`` (the model is modified in
    place: moved to the policy's dtype/device and, for LoRA, wrapped with adapters).
    The caller's global RNG state is left as it was (dropout draws from a forked, seeded RNG).
    """
    from ..api import resolve_device

    with make_parallel(cfg.distributed, resolve_device(cfg.device)) as par:
        device = par.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), attention_kernels(device):
            # Dropout draws: one stream per rank (rank 0's is the single-process one).
            torch.default_generator.manual_seed(cfg.seed + par.rank)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(cfg.seed + par.rank)
            return _finetune(cfg, device, model, tokenizer, instrument, par)


def _finetune(cfg: TrainConfig, device: torch.device, model: nn.Module | None, tokenizer: Any,
              instrument: Any, par: Any) -> TrainResult:
    t_start = time.perf_counter()
    policy = get_policy(cfg.precision)
    out = Path(cfg.output_dir)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        check_resume_config(cfg, ckpt.config, ckpt.path)
    records = check_data(cfg)  # before the model: a data or range error costs no loading time
    # Every rank checks (so all raise alike); only rank 0 deletes and creates.
    _prepare_output_dir(out, resuming=ckpt is not None, overwrite=cfg.overwrite, write=par.is_main)
    par.barrier()
    say = print if par.is_main else _quiet

    # ---- model, adapters, data
    model, tokenizer = par.load_model(cfg, policy, model, tokenizer, _load_model)
    if cfg.use_lora:
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # A matrices, same on CPU and CUDA
        apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                   generator=gen, lora_dtype=policy.adapter_dtype)
    else:
        model.requires_grad_(True)
    model.set_grad_checkpointing(cfg.grad_checkpoint)
    trainable_params, total_params = count_parameters(model)
    say(trainable_summary(model))
    model = par.wrap(model, cfg, policy)  # FSDP: shard (after LoRA, before the optimizer sees the parameters)
    train_set, val_set = load_data(cfg, tokenizer, say, records)
    # Any id works: right padding is never attended to by real tokens, and its labels are ignored.
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = int(tokenizer.eos_id if pad_id is None else pad_id)

    # ---- optimizer, schedule, loss scaler, data order
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device)
    total_steps = planned_steps(cfg, len(train_set))
    scheduler = make_schedule(optimizer, cfg, total_steps)
    scaler = par.make_scaler(policy, device.type)
    stream = DataStream(len(train_set), cfg.seed, cfg.batch_size,
                        epochs=None if cfg.max_steps is not None else cfg.epochs)
    step, tokens, target_tokens, runtime_s = 0, 0, 0, 0.0
    # Random weights only babble; sharded generation is not supported (generate from final/ instead).
    generate = cfg.generate_samples and not cfg.random_init and par.kind == "none"
    val_before: float | None = None
    gens_before: list[str] = []
    if ckpt is not None:  # ---- resume: every piece of state the next step depends on
        par.load_checkpoint(ckpt, model, optimizer, cfg.use_lora)  # weights + optimizer state
        scheduler.load_state_dict(ckpt.trainer["scheduler"])
        scaler.load_state_dict(ckpt.trainer["scaler"])
        stream.load_state_dict(ckpt.trainer["data"])
        par.restore_rng(ckpt.trainer, cfg.seed)
        step, tokens, target_tokens = ckpt.step, int(ckpt.trainer["tokens"]), int(ckpt.trainer["target_tokens"])
        runtime_s = float(ckpt.trainer["runtime_s"])
        val_before = ckpt.trainer.get("val_loss_before")
        gens_before = list(ckpt.trainer.get("generations_before", []))
        say(f"resumed from {ckpt.path} at step {step}")
    else:  # ---- baseline before any update: validation loss and sample generations
        if generate:
            gens_before = sample_generations(model, tokenizer, say, "before tuning")
        val_before = evaluate(model, val_set, policy, device, cfg.eval_batch_size, pad_id, par)
        if val_before is not None:
            say(f"val loss before: {val_before:.4f} (ppl {math.exp(val_before):.2f}) on {len(val_set)} records")

    def trainer_state() -> dict[str, Any]:
        """Everything besides the weights and the optimizer that the next step depends on, as of the
        last completed step (the parallel context saves weights and optimizer: whole or sharded)."""
        return {"scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "data": committed_data, "rng": committed_rng,
                "tokens": tokens, "target_tokens": target_tokens, "runtime_s": runtime_s,
                "val_loss_before": val_before, "generations_before": gens_before}

    def save(at_step: int) -> Path:
        return par.save_checkpoint(out, at_step, model, optimizer, cfg.use_lora, trainer_state(), cfg.to_dict())

    # ---- the loop
    if par.is_main:
        log: Any = MetricsLog(out, resume_step=step if ckpt is not None else None,
                              earlier=ckpt.path.parent.parent / METRICS if ckpt is not None else None)
        progress: Any = Progress(total_steps, step, cfg.progress, cfg.log_every)
    else:  # only rank 0 writes metrics and progress
        log, progress = _RecordsOnly(), _RecordsOnly()
    fwd_ctx = getattr(instrument, "forward_context", None)
    before_step = getattr(instrument, "before_step", None)
    after_step = getattr(instrument, "after_step", None)
    committed_data, committed_rng = stream.state_dict(), capture_rng(device)
    last_saved: Path | None = None
    reset_peak_memory(device)
    model.train()
    with par.interrupts():  # N ranks: Ctrl-C becomes a flag, checked after each step
        try:
            while step < total_steps:
                t0 = time.perf_counter()
                window = [_collate_share([train_set[i] for i in par.share(idx)], pad_id)
                          for idx in stream.take_window(cfg.grad_accum)]
                if not window:
                    break  # data exhausted (epochs mode ends on a partial window)
                n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
                n_tokens = sum(int(b["attention_mask"].sum()) for b in window)
                n_targets, n_tokens = (int(v) for v in par.all_reduce_sum(n_targets, n_tokens))  # over all ranks
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for j, batch in enumerate(window):
                    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                    with fwd_ctx() if fwd_ctx else contextlib.nullcontext(), par.accumulate(model, last=j == len(window) - 1):
                        with policy.autocast(device.type):
                            logits = model(input_ids)
                        micro = token_loss_sum(logits, labels)  # fp32 sum over this micro-batch's targets
                        # Normalise by the whole window's target count: k micro-batches == one batch of k.
                        # (grad_sum_factor: FSDP averages the ranks' gradients; this makes it their sum.)
                        share = micro * par.grad_sum_factor if par.grad_sum_factor != 1 else micro
                        scaler.scale(share / max(n_targets, 1)).backward()
                    loss_sum += micro.detach()
                    del logits, micro
                loss = par.all_reduce_sum(loss_sum.item())[0] / max(n_targets, 1)
                scaler.check_finite(loss, step + 1)
                if before_step:
                    before_step(model, optimizer, step + 1)
                lr = optimizer.param_groups[0]["lr"]
                with _defer_sigint():  # an update and its bookkeeping are never cut in half by Ctrl-C
                    scaler.unscale_(optimizer)
                    grad_norm = par.clip_grad_norm(params, cfg.max_grad_norm)
                    took_step = scaler.step(optimizer)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    tokens += n_tokens
                    target_tokens += n_targets
                    dt = time.perf_counter() - t0
                    runtime_s += dt
                    committed_data, committed_rng = stream.state_dict(), capture_rng(device)
                recent = [r["loss"] for r in log.records[-4:]] + [loss]
                rec = {"step": step, "loss": loss, "loss_avg5": sum(recent) / len(recent), "lr": lr, "tokens": tokens,
                       "target_tokens": target_tokens, "tokens_per_s": n_tokens / dt, "grad_norm": grad_norm,
                       "peak_mem": peak_memory_bytes(device), "epoch": stream.epoch, "skipped": not took_step,
                       "time_s": runtime_s}
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    rec["val_loss"] = evaluate(model, val_set, policy, device, cfg.eval_batch_size, pad_id, par)
                    model.train()  # eval mode draws no random numbers: resume stays bit-exact
                log.write(rec)
                progress.update(rec)
                if not took_step:
                    progress.write(f"step {step}: non-finite gradients, update skipped (loss scale now {scaler.get_scale():g})")
                if after_step:
                    after_step(model, optimizer, step)
                par.check_interrupt()  # N ranks: a Ctrl-C on any of them stops all after this same step
                if cfg.save and cfg.save_every and step % cfg.save_every == 0:
                    last_saved = save(step)
        except KeyboardInterrupt:
            progress.close()
            log.close()
            if cfg.save:
                path = save(step)
                if par.is_main:
                    print(f"\ninterrupted: saved a checkpoint of step {step} to {path}\n"
                          f"continue with: solotune finetune --resume {out}", file=sys.stderr)
            raise
    progress.close()
    log.close()
    peaks = [int(p) for p in par.gather(peak_memory_bytes(device))]
    peak = max(peaks)
    final_dir = None
    if cfg.save:
        saved = list_checkpoints(out)
        if not saved or saved[-1][0] != step:
            last_saved = save(step)
        final_dir = par.save_final(out / FINAL, model, cfg, tokenizer)

    # ---- after: validation loss, generations, summary
    val_after = evaluate(model, val_set, policy, device, cfg.eval_batch_size, pad_id, par)
    gens_after = sample_generations(model, tokenizer, say, "after tuning") if generate else []
    losses = [r["loss"] for r in log.records]
    result = TrainResult(
        final_loss=losses[-1] if losses else None, val_loss=val_after, val_loss_before=val_before,
        peak_memory_bytes=peak, output_dir=out, steps=step, tokens=tokens, target_tokens=target_tokens,
        runtime_s=runtime_s, tokens_per_s=tokens / runtime_s if runtime_s > 0 else 0.0,
        trainable_params=trainable_params, total_params=total_params, skipped_steps=scaler.skipped_steps,
        avg_loss=sum(losses) / len(losses) if losses else None, first_loss=losses[0] if losses else None,
        val_curve=[v for v in [val_before, *(r.get("val_loss") for r in log.records), val_after] if v is not None],
        losses=losses, final_dir=final_dir, last_checkpoint=last_saved, generations_before=gens_before,
        generations_after=gens_after, resumed_from=ckpt.path if ckpt else None,
        world_size=par.world_size, peak_memory_bytes_per_rank=peaks,
    )
    if not par.is_main:
        return result
    summary = summary_dict(result, cfg, device, time.perf_counter() - t_start)
    write_json(out / SUMMARY, summary)
    try:
        plot_loss(log.records, out / LOSS_PNG, val_before, val_after, title=f"{cfg.model} ({summary['mode']})")
    except Exception as e:  # a plotting problem must not lose a finished run
        warnings.warn(f"could not draw {out / LOSS_PNG}: {e}")
    say(format_summary(summary))
    return result


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], policy: PrecisionPolicy, device: torch.device,
             batch_size: int, pad_id: int, par: Any = None) -> float | None:
    """Mean next-token loss over all target tokens of ``examples`` (None when there are none).
    Leaves the model in eval mode. With a parallel context of N ranks each rank evaluates its own
    ``batch_size`` examples of every N * ``batch_size`` and the sums are added up."""
    if not len(examples):
        return None
    rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size * world):
        lo = min(i + rank * batch_size, len(examples))
        b = _collate_share(list(examples[lo:min(lo + batch_size, len(examples))]), pad_id)
        with policy.autocast(device.type):
            logits = model(b["input_ids"].to(device))
        total += float(token_loss_sum(logits, b["labels"].to(device)).double())
        count += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    if par is not None:
        total, count = par.all_reduce_sum(total, count)
    return total / count if count else None


def _collate_share(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """``collate``; an empty share (a rank's part of a micro-batch that has fewer examples than
    ranks) becomes one padding row without targets: the rank still takes part in the forward and
    backward (FSDP's collectives need every rank) and adds exactly zero loss and gradient."""
    if examples:
        return collate(examples, pad_id)
    return {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
            "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((1, 2), dtype=torch.bool)}


# ============================================================================== schedule
def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup over ``warmup``
    steps to 1, then constant or cosine towards ``min_ratio`` (reached one step after the last)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, total_steps, cfg.lr_schedule, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """``max_steps``, or enough windows to cover ``epochs`` passes (the last window may be partial)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum))


# ================================================================================= data order
class DataStream:
    """Example indices in a seeded order, epoch after epoch; its position is two integers.

    The order of epoch e is ``epoch_order(n, seed, e)``, a pure function, so resuming needs only
    (epoch, index). With ``epochs`` set the stream ends after that many passes; otherwise it cycles.
    """

    def __init__(self, n: int, seed: int, batch_size: int, epochs: int | None) -> None:
        self.n, self.seed, self.batch_size, self.epochs = n, seed, batch_size, epochs
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            if self._order is None:
                self._order = epoch_order(self.n, self.seed, self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def take_window(self, micro_batches: int) -> list[list[int]]:
        """Up to ``micro_batches`` lists of ``batch_size`` indices (fewer at the very end)."""
        window = []
        for _ in range(micro_batches):
            idx = self._take(self.batch_size)
            if not idx:
                break
            window.append(idx)
        return window

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


# ================================================================================== set-up
def _load_model(cfg: TrainConfig, policy: PrecisionPolicy, device: torch.device, model: nn.Module | None,
                tokenizer: Any) -> tuple[nn.Module, Any]:
    if model is not None:
        if tokenizer is None:
            raise ValueError("finetune(model=...) also needs tokenizer=...")
        return model.to(device=device, dtype=policy.param_dtype), tokenizer
    from ..api import load

    return load(cfg.model, dtype=policy.param_dtype, device=device, random_init=cfg.random_init,
                n_layers=cfg.n_layers, seed=cfg.seed)


def _prepare_output_dir(out: Path, resuming: bool, overwrite: bool, write: bool = True) -> None:
    """Refuse to mix two runs' checkpoints; ``write=False`` only checks (ranks other than 0)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} exists and is not a directory")
    if not resuming and list_checkpoints(out):
        # A fresh run would interleave its checkpoints with the old run's and --resume could pick the wrong one.
        if not overwrite:
            raise FileExistsError(f"output_dir {out} already holds a run's checkpoints: pass resume={str(out)!r} "
                                  f"(--resume {out}) to continue it, overwrite=True (--overwrite) to start over, "
                                  f"or choose another output_dir")
        if not write:
            return
        for name in (CHECKPOINTS, FINAL):  # only what a run writes; anything else in the folder stays
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (METRICS, SUMMARY, LOSS_PNG):
            (out / name).unlink(missing_ok=True)
    if write:
        out.mkdir(parents=True, exist_ok=True)


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """A resumed run must agree with the checkpoint on everything that shapes the trajectory."""
    try:
        old = TrainConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config.json is not a valid TrainConfig: {e}") from None
    diffs = [f"{f}: checkpoint {getattr(old, f)!r} vs now {getattr(cfg, f)!r}"
             for f in TRAJECTORY_FIELDS if getattr(old, f) != getattr(cfg, f)]
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run's settings differ ({'; '.join(diffs)}). "
                         f"Resume with the checkpoint's settings (the CLI does this when you only pass --resume).")


# ================================================================================ reporting
def sample_generations(model: nn.Module, tokenizer: Any, say, when: str, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to :data:`SAMPLE_PROMPTS` (empty when generation is unavailable)."""
    try:
        from ..generate import generate
    except ImportError:
        return []
    model.eval()
    prompts = [format_prompt(r) for r in SAMPLE_PROMPTS]
    with torch.no_grad():
        texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop=["###"])
    if hasattr(model, "clear_cache"):
        model.clear_cache()
    say(f"--- sample generations {when} (greedy) ---")
    for r, t in zip(SAMPLE_PROMPTS, texts):
        say(f"> {r.instruction}{' | ' + r.input if r.input else ''}\n  {t.strip()}")
    return list(texts)


def summary_dict(r: TrainResult, cfg: TrainConfig, device: torch.device, total_s: float) -> dict[str, Any]:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(r).items()}
    d.pop("losses")
    d.update({
        "distributed": cfg.distributed, "model": cfg.model, "mode": f"LoRA r={cfg.lora_rank} on {','.join(cfg.lora_targets)}" if cfg.use_lora else "full",
        "precision": cfg.precision, "grad_checkpoint": cfg.grad_checkpoint, "device": str(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "val_perplexity": r.val_perplexity, "total_runtime_s": total_s, "config": cfg.to_dict(),
    })
    return d


def _quiet(*args: Any, **kw: Any) -> None:
    """``say`` on ranks other than 0."""


class _RecordsOnly:
    """Metrics log and progress bar of ranks other than 0: keeps the records, writes nothing."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: Any) -> None:
        if isinstance(record, dict):
            self.records.append(record)

    def update(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block is done (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        # getsignal() is None for a handler installed outside Python: fall back to Python's default.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if caught:
            # Hand the held Ctrl-C to the handler that was there (Python's raises KeyboardInterrupt;
            # a distributed run's sets the flag all ranks agree on).
            if callable(previous):
                previous(*caught[0])
            else:
                raise KeyboardInterrupt
