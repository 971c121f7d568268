"""The one training loop: LoRA and full fine-tuning, every precision, gradient accumulation and
checkpointing policy, resume and Ctrl-C, all through :func:`finetune`.

Reading order: :func:`finetune` (claims the output dir) -> :func:`_finetune` (set-up, the loop,
the end) -> ``step.py`` (one accumulation window: forward, loss, backward, update) -> ``loss.py``
(the loss owns the output head) -> ``optim.py`` (optimizer by name, schedule). Around it:
``run_state.py`` (counters, data position, RNG), ``saver.py`` and ``state.py`` (checkpoints),
``run_dir.py`` (lock, refusal, clean-up), ``interrupts.py`` (Ctrl-C, SIGTERM), ``weights.py``
(final/, adapters), ``metrics.py`` (metrics.jsonl, loss.png, summary).

The same loop runs on N processes under ``torchrun`` (``distributed="fsdp"``): whatever differs is
asked of the parallel context ``par`` (``solotune/parallel``; one process: no-ops). ``batch_size`` is
then the global micro-batch, each rank computes its share, and token counts and losses are summed
over ranks, so the curve is the single-process one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ..data import Example, Record
from ..data.conversations import prompt_text
from ..data.batch import Batch, collate_batch, empty_batch
from ..data.packing import pack_window
from ..errors import ConfigError, OutOfMemory
from ..parallel import make_parallel
from ..peft import apply_lora, count_parameters, trainable_summary
from .config import TRAJECTORY_FIELDS, TrainConfig
from .graphs import GraphSteps
from .inputs import chat_samples, check_data, load_data
from .interrupts import terminate_saves
from .loss import get_loss
from .metrics import (
    LOSS_PNG, METRICS, SUMMARY, MetricsLog, Progress, format_summary, peak_memory_bytes, plot_loss, reset_peak_memory,
    write_json,
)
from .offload import HostOutOfMemory, offload_context
from .optim import grad_norm_fn, make_optimizer, make_schedule
from .precision import PrecisionPolicy, get_policy
from .run_dir import claim_run_dir
from .run_state import DataStream, TrainState
from .saver import CheckpointSaver
from .state import load_checkpoint
from .step import StepContext, StepResult, train_step
from .weights import FINAL
from .sharded import load_training_checkpoint, restore_rank_rng, save_final_weights


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

    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        check_resume_config(cfg, ckpt.config, ckpt.path)
    records = check_data(cfg)  # before the model and the output dir: a data error costs no loading time
    with make_parallel(cfg.distributed, resolve_device(cfg.device)) as par:
        device = par.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        # Every rank checks the output dir (so all raise alike); only rank 0 creates, locks and cleans it.
        with torch.random.fork_rng(devices=devices), attention_kernels(device), \
                claim_run_dir(Path(cfg.output_dir), resuming=ckpt is not None, overwrite=cfg.overwrite,
                              write=par.is_main):
            par.barrier()
            # Dropout draws: one stream per rank (rank 0's is the single-process one).
            torch.default_generator.manual_seed(cfg.seed + par.rank)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(cfg.seed + par.rank)
            return _finetune(cfg, par, ckpt, records, model, tokenizer, instrument)


def _finetune(cfg: TrainConfig, par: Any, ckpt: Any, records: Any, model: nn.Module | None, tokenizer: Any,
              instrument: Any) -> TrainResult:
    t_start = time.perf_counter()
    policy, device, out = get_policy(cfg.precision), par.device, Path(cfg.output_dir)
    say = print if par.is_main else _quiet

    # ---- model, adapters, data, optimizer, run state
    model, tokenizer = par.load_model(cfg, policy, model, tokenizer, _load_model)
    trainable_params, total_params = _attach_adapters(model, cfg, policy, say)
    model = par.wrap(model, cfg, policy)  # FSDP: shard (after LoRA, before the optimizer sees the parameters)
    train_set, val_set = load_data(cfg, tokenizer, say, records)
    pad_id = pad_id_of(tokenizer)
    optimizer = make_optimizer(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device,
                               in_backward=cfg.optimizer_in_backward, offload="optimizer" in cfg.offload_targets)
    total_steps = planned_steps(cfg, len(train_set))
    schedule = make_schedule(optimizer, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.lr_schedule,
                             min_ratio=cfg.min_lr_ratio)
    state = TrainState(schedule, par.make_scaler(policy, device.type),
                       DataStream(len(train_set), cfg.seed, cfg.batch_size,
                                  epochs=None if cfg.max_steps is not None else cfg.epochs), device)
    # compiled runs compile the loss too (the head's fp32 logits then never exist: train/loss.py)
    loss_fn = get_loss(cfg.loss, compiled=cfg.compiles(device.type))
    trainable = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphSteps(trainable, cfg.replays_graphs(device.type))
    ctx = StepContext(model, optimizer, trainable, policy, loss_fn,
                      par, device, cfg.max_grad_norm, getattr(instrument, "forward_context", None),
                      getattr(instrument, "before_step", None),
                      offload_context("activations" if "activations" in cfg.offload_targets else "none", model, device),
                      grad_norm_fn(optimizer, par), graphs)
    validate = graphs.outside(functools.partial(evaluate, model, val_set, policy, device, cfg.eval_batch_size,
                                                pad_id, par, loss_name=cfg.loss))
    sample = graphs.outside(sample_generations)
    # Random weights only babble; sharded generation is not supported (generate from final/ instead).
    generate = cfg.generate_samples and not cfg.random_init and par.kind == "none"
    chat = generate and chat_samples(cfg, tokenizer, records)  # samples as the run renders its records

    # ---- resume every piece of state the next step depends on, or measure the baseline
    if ckpt is not None:
        load_training_checkpoint(par, ckpt, model, optimizer, cfg.use_lora)  # weights + optimizer state
        state.load_state_dict(ckpt.trainer, lambda d: restore_rank_rng(par, d, cfg.seed))
        say(f"resumed from {ckpt.path} at step {state.step}")
    else:
        if generate:
            state.generations_before = sample(model, tokenizer, say, "before tuning", chat=chat)
        state.val_loss_before = validate()
        if state.val_loss_before is not None:
            say(f"val loss before: {state.val_loss_before:.4f} (ppl {math.exp(state.val_loss_before):.2f}) "
                f"on {len(val_set)} records")

    # ---- the loop
    saver = CheckpointSaver(cfg, out, par, model, optimizer, state)
    log, progress = _open_logs(cfg, out, par, ckpt, state.step, total_steps)
    reset_peak_memory(device)
    state.commit()
    model.train()
    with par.interrupts(), terminate_saves():  # N ranks: Ctrl-C becomes a flag, checked after each step
        try:
            _train(ctx, state, cfg, total_steps, window_collator(cfg, train_set, pad_id, par),
                   validate, log, progress, saver, getattr(instrument, "after_step", None))
        except KeyboardInterrupt as stop:
            progress.close()
            log.close()
            if cfg.save:
                saver.save_on_exit(stop)
            raise
        except torch.OutOfMemoryError as oom:
            progress.close()
            log.close()
            raise _out_of_memory(oom, cfg, state.step + 1, device, saver.last or (ckpt.path if ckpt else None),
                                 out) from None
    progress.close()
    log.close()

    # ---- the end: checkpoint, final/, validation, generations, summary
    peaks = [int(p) for p in par.gather(peak_memory_bytes(device))]
    final_dir = None
    if cfg.save:
        saver.save_final()
        final_dir = save_final_weights(par, out / FINAL, model, cfg, tokenizer)
    val_after = validate()
    gens_after = sample(model, tokenizer, say, "after tuning", chat=chat) if generate else []
    result = _result(cfg, state, log.records, out, peaks, val_after, trainable_params, total_params, final_dir,
                     saver.last, gens_after, ckpt, par.world_size)
    if par.is_main:
        _write_summary(result, cfg, device, time.perf_counter() - t_start, log.records, out, say)
    return result


def _out_of_memory(oom: BaseException, cfg: TrainConfig, step: int, device: torch.device, last: Path | None,
                   out: Path) -> OutOfMemory:
    """The one line a run that ran out of memory ends with. Nothing is saved after it: a step cut short
    (in the optimizer's update, say) may have changed part of the model, so the last checkpoint is
    what resumes."""
    full = str(oom).strip()
    what = full.splitlines()[0] if full else type(oom).__name__
    kept = (f"the last checkpoint, {last}, resumes with `solotune finetune --resume {out}`" if last is not None
            else "no checkpoint was written before it")
    plan = f"`solotune plan --model {cfg.model} --gpu-mem <GiB> --seq-len {cfg.max_seq_len} --batch {cfg.batch_size}"
    if isinstance(oom, HostOutOfMemory):  # the host's RAM, not the GPU's (train/offload.py)
        fix = f"{plan} --offload activations --host-mem <GiB>`; or a smaller --batch-size or --max-seq-len"
    else:
        fix = (f"{plan}`; or a smaller --batch-size or --max-seq-len, --grad-checkpoint all, "
               "--loss fused-linear-ce, --quantize nf4, --offload activations")
    return OutOfMemory(
        f"out of memory in optimizer step {step} ({what}; peak so far {peak_memory_bytes(device) / 2**30:.2f} GiB); "
        f"nothing was saved after it, {kept}. What fits: {fix}", full)


def _train(ctx: StepContext, state: TrainState, cfg: TrainConfig, total_steps: int,
           collate_window: Callable[[list[list[int]]], list[Batch]],
           validate: Any, log: Any, progress: Any, saver: CheckpointSaver, after_step: Any) -> None:
    """Optimizer steps until ``total_steps`` (or the data ends, in epochs mode): log, evaluate,
    checkpoint after each."""
    while state.step < total_steps:
        window = collate_window(state.stream.take_window(cfg.grad_accum))
        if not window:
            break  # data exhausted (epochs mode ends on a partial window)
        res = train_step(ctx, state, window)
        rec = _record(res, state, log.records, ctx.offload)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
            rec["val_loss"] = validate()
            ctx.model.train()  # eval mode draws no random numbers: resume stays bit-exact
        log.write(rec)
        progress.update(rec)
        if not res.took_step:
            progress.write(f"step {state.step}: non-finite gradients, update skipped "
                           f"(loss scale now {state.scaler.get_scale():g})")
        if after_step:
            after_step(ctx.model, ctx.optimizer, state.step)
        ctx.par.check_interrupt()  # N ranks: a Ctrl-C on any of them stops all after this same step
        if saver.due():
            saver.save_periodic()


def _record(res: StepResult, state: TrainState, records: list[dict[str, Any]], offload: Any = None) -> dict[str, Any]:
    """One metrics.jsonl line (with activation offload: ``host_peak_mem``, the most bytes of host
    copies alive at once so far, what the planner's ``host_bytes`` predicts)."""
    recent = [r["loss"] for r in records[-4:]] + [res.loss]
    stats = getattr(offload, "stats", None)
    return {"step": state.step, "loss": res.loss, "loss_avg5": sum(recent) / len(recent), "lr": res.lr,
            "tokens": state.tokens, "target_tokens": state.target_tokens, "tokens_per_s": res.tokens / res.seconds,
            "grad_norm": res.grad_norm, "peak_mem": peak_memory_bytes(state.device), "epoch": state.stream.epoch,
            "skipped": not res.took_step, "time_s": state.runtime_s,
            **({"host_peak_mem": stats.host_peak_bytes} if stats is not None else {})}


# ================================================================================== set-up
def _load_model(cfg: TrainConfig, policy: PrecisionPolicy, device: torch.device, model: nn.Module | None,
                tokenizer: Any) -> tuple[nn.Module, Any]:
    if model is not None:
        if tokenizer is None:
            raise ValueError("finetune(model=...) also needs tokenizer=...")
        model = model.to(device=device, dtype=policy.param_dtype)
        if cfg.quantize != "none":
            from ..quant import swap_in_quantized

            swap_in_quantized(model, cfg.quantize, compute_dtype=policy.param_dtype)
        return model, tokenizer
    from ..api import load

    # meta (FSDP, random weights): nothing to draw here, the shards are initialised after sharding.
    return load(cfg.model, dtype=policy.param_dtype, device=device, random_init=cfg.random_init,
                n_layers=cfg.n_layers, seed=None if device.type == "meta" else cfg.seed, quantize=cfg.quantize)


def _attach_adapters(model: nn.Module, cfg: TrainConfig, policy: PrecisionPolicy, say: Any) -> tuple[int, int]:
    """LoRA adapters (or every weight trainable for full fine-tuning) and the checkpointing
    policy; returns (trainable, total) parameter counts."""
    if cfg.use_lora:
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # A matrices, same on CPU and CUDA
        apply_lora(model, cfg.lora, generator=gen, lora_dtype=policy.adapter_dtype)
    else:
        model.requires_grad_(True)
    model.set_grad_checkpointing(cfg.grad_checkpoint)
    if cfg.kernels != "off":
        from ..kernels import use_fused_kernels

        use_fused_kernels(model)
    device_type = next(model.parameters()).device.type
    packs, compiles = cfg.packs(device_type), cfg.compiles(device_type)
    if compiles:
        model.compile_blocks(**cfg.compile_options(device_type))
    say(trainable_summary(model))
    if packs or compiles:
        say(f"speed: packing {'on' if packs else 'off'} (rows of {cfg.max_seq_len} tokens), "
            f"compiled blocks {'on' if compiles else 'off'}"
            + (" (replayed as CUDA graphs)" if cfg.replays_graphs(device_type) else ""))
    return count_parameters(model)


def pad_id_of(tokenizer: Any) -> int:
    """Any id works: right padding is never attended to by real tokens, and its labels are ignored."""
    pad_id = getattr(tokenizer, "pad_id", None)
    return int(tokenizer.eos_id if pad_id is None else pad_id)


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """``max_steps``, or enough windows to cover ``epochs`` passes (the last window may be partial)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum))


def _open_logs(cfg: TrainConfig, out: Path, par: Any, ckpt: Any, step: int, total_steps: int) -> tuple[Any, Any]:
    """metrics.jsonl and the progress bar (rank 0; other ranks keep the records and write nothing)."""
    if not par.is_main:
        return _RecordsOnly(), _RecordsOnly()
    log = MetricsLog(out, resume_step=step if ckpt is not None else None,
                     earlier=ckpt.path.parent.parent / METRICS if ckpt is not None else None,
                     tensorboard=cfg.tensorboard)
    return log, Progress(total_steps, step, cfg.progress, cfg.log_every)


# ============================================================================== evaluation
@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], policy: PrecisionPolicy, device: torch.device,
             batch_size: int, pad_id: int, par: Any = None, loss_name: str = "full-logits") -> float | None:
    """Mean next-token loss over all target tokens of ``examples`` (None when there are none).
    Leaves the model in eval mode. With a parallel context of N ranks each rank evaluates its own
    ``batch_size`` examples of every N * ``batch_size`` and the sums are added up."""
    if not len(examples):
        return None
    rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
    loss_fn = get_loss(loss_name)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size * world):
        lo = min(i + rank * batch_size, len(examples))
        b = _collate_share(list(examples[lo:min(lo + batch_size, len(examples))]), pad_id).to(device)
        with policy.autocast(device.type):
            total += float(model(b, head=functools.partial(loss_fn, labels=b.labels)).double())
        count += b.num_targets
    if par is not None:
        total, count = par.all_reduce_sum(total, count)
    return total / count if count else None


def window_collator(cfg: TrainConfig, train_set: Sequence[Example], pad_id: int,
                    par: Any) -> Callable[[list[list[int]]], list[Batch]]:
    """Indices of one accumulation window (a list per micro-batch) -> its micro-batches: one padded
    micro-batch per index list (this rank's share of it), or with ``packing`` the window's examples
    packed into rows of ``max_seq_len`` tokens, ``batch_size`` rows per micro-batch."""
    if cfg.packs(par.device.type):
        return lambda window: pack_window([train_set[i] for idx in window for i in idx], cfg.max_seq_len,
                                          cfg.batch_size, pad_id) if window else []
    return lambda window: [_collate_share([train_set[i] for i in par.share(idx)], pad_id) for idx in window]


def _collate_share(examples: Sequence[Example], pad_id: int) -> Batch:
    """``collate_batch``; an empty share (a rank's part of a micro-batch that has fewer examples than
    ranks) becomes one padding row without targets: the rank still takes part in the forward and
    backward (FSDP's collectives need every rank) and adds exactly zero loss and gradient."""
    return collate_batch(examples, pad_id) if examples else empty_batch(pad_id)


# =============================================================================== the end
def _result(cfg: TrainConfig, state: TrainState, records: list[dict[str, Any]], out: Path, peaks: list[int],
            val_after: float | None, trainable: int, total: int, final_dir: Path | None, last_saved: Path | None,
            gens_after: list[str], ckpt: Any, world_size: int) -> TrainResult:
    losses = [r["loss"] for r in records]
    val_before = state.val_loss_before
    return TrainResult(
        final_loss=losses[-1] if losses else None, val_loss=val_after, val_loss_before=val_before,
        peak_memory_bytes=max(peaks), output_dir=out, steps=state.step, tokens=state.tokens,
        target_tokens=state.target_tokens, runtime_s=state.runtime_s,
        tokens_per_s=state.tokens / state.runtime_s if state.runtime_s > 0 else 0.0,
        trainable_params=trainable, total_params=total, skipped_steps=state.scaler.skipped_steps,
        avg_loss=sum(losses) / len(losses) if losses else None, first_loss=losses[0] if losses else None,
        val_curve=[v for v in [val_before, *(r.get("val_loss") for r in records), val_after] if v is not None],
        losses=losses, final_dir=final_dir, last_checkpoint=last_saved,
        generations_before=list(state.generations_before), generations_after=gens_after,
        resumed_from=ckpt.path if ckpt else None, world_size=world_size, peak_memory_bytes_per_rank=peaks,
    )


def _write_summary(result: TrainResult, cfg: TrainConfig, device: torch.device, total_s: float,
                   records: list[dict[str, Any]], out: Path, say: Any) -> None:
    summary = summary_dict(result, cfg, device, total_s)
    write_json(out / SUMMARY, summary)
    try:
        plot_loss(records, out / LOSS_PNG, result.val_loss_before, result.val_loss,
                  title=f"{cfg.model} ({summary['mode']})")
    except Exception as e:  # a plotting problem must not lose a finished run
        warnings.warn(f"could not draw {out / LOSS_PNG}: {e}")
    say(format_summary(summary))


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """A resumed run must agree with the checkpoint on everything that shapes the trajectory."""
    try:
        old = TrainConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: its config.json is not a valid TrainConfig: {e}") from None
    diffs = [f"{f}: checkpoint {getattr(old, f)!r} vs now {getattr(cfg, f)!r}"
             for f in TRAJECTORY_FIELDS if getattr(old, f) != getattr(cfg, f)]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: the run's settings differ ({'; '.join(diffs)}). "
                         f"Resume with the checkpoint's settings (the CLI does this when you only pass --resume).")


# ================================================================================ reporting
def sample_generations(model: nn.Module, tokenizer: Any, say, when: str, max_new_tokens: int = 48,
                       chat: bool = False) -> list[str]:
    """Greedy answers to :data:`SAMPLE_PROMPTS` (empty when generation is unavailable); ``chat``:
    as user turns of the chat template instead of Alpaca prompts."""
    try:
        from ..generate import generate
    except ImportError:
        return []
    model.eval()
    prompts = [prompt_text(r, chat) for r in SAMPLE_PROMPTS]
    with torch.no_grad():
        texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0, chat=chat,
                         stop=None if chat else ["###"])
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
