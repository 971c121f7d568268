"""``solotune bench`` and ``solotune plan``: arguments and bodies (``solotune.cli`` dispatches here)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from .plan import PRECISIONS, parse_bytes
from ..peft.spec import LoRASpec
from ..train.config import OFFLOAD as _OFFLOAD, QUANTIZE as _QUANTIZE
from ..train.optim import OPTIMIZERS as _OPTIMIZERS


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama2-7b", help="architecture preset (random init) or checkpoint path")
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth (e.g. 1)")
    p.add_argument("--samples", type=int, default=200,
                   help="Alpaca training records per cell (1..200); --data random: rows per cell")
    p.add_argument("--seq-len", type=int, default=512,
                   help="truncate examples to this many tokens (--data random: every row's length)")
    p.add_argument("--data", choices=["alpaca-sample", "random"], default="alpaca-sample",
                   help="alpaca-sample (bundled records, prompt-masked) or random: fixed-length rows of random "
                        "tokens, every position a target (seeded; the same rows for every implementation)")
    p.add_argument("--micro-batch", type=int, default=1, help="examples per micro-batch (course: 1)")
    p.add_argument("--axes", type=_csv, default=("ga", "precision", "lora", "gc"),
                   help="techniques to switch on/off, from ga,precision,lora,gc,packing,compile,kernels "
                        "(default: the course's four = 16 cells)")
    p.add_argument("--fix", type=_csv, default=(),
                   help="pin axes left out of --axes, e.g. ga=on,precision=on (default: ga/gc/precision off, lora on)")
    p.add_argument("--precision-on", default="fp16-amp", choices=["fp16-amp", "bf16-amp", "bf16"],
                   help="what 'mixed precision on' means (off = fp32); the course used fp16 AMP")
    p.add_argument("--ga-on", type=int, default=8, help="accumulation steps when GA is on")
    p.add_argument("--gc-on", default="all", help="checkpointing policy when GC is on (all | every:K)")
    p.add_argument("--reference", default=None,
                   help="also run each cell with hf (transformers + peft; with --quantize nf4: + bitsandbytes) "
                        "and/or hf-liger (+ Liger-Kernel's fused kernels), comma-separated, when installed")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/bench-MODEL[-Nl])")
    p.add_argument("--device", default="auto")
    p.add_argument("--cell-timeout", type=float, default=1200.0, help="seconds before a cell is killed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="per-cell training seconds; a cell stops after the step that crosses it and its runtime "
                        "is extrapolated to all samples (marked in the report)")
    p.add_argument("--sdpa", choices=["no-cudnn", "auto"], default="no-cudnn",
                   help="attention kernels on CUDA: no-cudnn (flash / memory-efficient; cuDNN re-plans for every new "
                        "sequence length) or auto (torch's choice)")
    p.add_argument("--lora-rank", type=int, default=LoRASpec.rank)
    p.add_argument("--lora-alpha", type=float, default=LoRASpec.alpha)
    p.add_argument("--lora-dropout", type=float, default=LoRASpec.dropout)
    p.add_argument("--lora-targets", type=_csv, default=LoRASpec.targets)
    p.add_argument("--quantize", choices=list(_QUANTIZE), default="none",
                   help="frozen base of the LoRA cells: nf4 (QLoRA), int8, or fp8 (multiplied in fp8)")
    p.add_argument("--offload", choices=list(_OFFLOAD), default="none",
                   help="activations and/or optimizer (its state in pinned host memory)")
    p.add_argument("--optimizer", choices=[*_OPTIMIZERS, "auto"], default="adamw",
                   help="adamw | adamw-8bit | auto: each full fine-tuning cell gets the cheapest optimizer technique "
                        "that `plan` predicts to fit --memory-limit (8-bit states, in backward, state offload)")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="update each parameter in its gradient hook (cells with grad_accum 1)")
    p.add_argument("--memory-limit", default=None,
                   help="cap each cell's CUDA memory (e.g. 24GiB) to reproduce a smaller GPU; such cells run "
                        "with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless it is set")
    from .cell import LOOP_OPTIONS  # TrainConfig's defaults: a cell runs what finetune would

    for name, choices in (("packing", "auto | off | on"), ("compile", "auto | off | blocks | blocks-cudagraphs"),
                          ("kernels", "off | triton"), ("loss", "train/loss.py LOSSES")):
        p.add_argument(f"--{name}", default=LOOP_OPTIONS[name],
                       help=f"TrainConfig.{name} of the solotune cells ({choices}; default {LOOP_OPTIONS[name]}); "
                            "reference cells run it off")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="first optimizer steps timed apart (warm-up, compilation); tokens/s steady = the later steps")
    p.add_argument("--find-max-seq-len", action="store_true",
                   help="instead of the matrix: the longest --data random row that trains at micro-batch 1 under "
                        "--memory-limit, by real cells around the planner's longest (max_seq_len.json)")
    p.add_argument("--max-probes", type=int, default=3, help="cells per --find-max-seq-len search")
    p.add_argument("--probe-samples", type=int, default=2,
                   help="--find-max-seq-len: optimizer steps per probe (2: steady state; 1: faster, misses LoRA's "
                        "small optimizer state)")
    p.add_argument("--probe-step", type=float, default=0.04,
                   help="--find-max-seq-len: relative distance of the first probes from the planner's longest")
    p.add_argument("--probe-start", type=float, default=1.0,
                   help="--find-max-seq-len: the first probe at this fraction of the planner's longest (e.g. 0.985 "
                        "leaves the allocator's slack a margin when one probe costs minutes)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)


def cmd_bench(args: argparse.Namespace) -> int:
    from .runner import BenchConfig, run_bench

    out = args.out or f"benchmarks/results/bench-{args.model.replace('/', '_')}" + (f"-{args.layers}l" if args.layers else "")
    # The command as typed when it came through the CLI; otherwise (API use) an equivalent one.
    argv = sys.argv[1:]
    command = "solotune " + shlex.join(argv) if argv[:1] == ["bench"] else "solotune bench " + shlex.join(_bench_argv(args, out))
    bc = BenchConfig(model=args.model, layers=args.layers, samples=args.samples, seq_len=args.seq_len,
                     micro_batch=args.micro_batch, axes=tuple(a for a in args.axes if a != "none"),
                     fixed=_parse_fix(args.fix), ga_on=args.ga_on, gc_on=args.gc_on,
                     precision_on=args.precision_on, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                     lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, lr=args.lr, seed=args.seed,
                     reference=args.reference, device=args.device, quantize=args.quantize, offload=args.offload,
                     optimizer=args.optimizer, optimizer_in_backward=args.optimizer_in_backward,
                     memory_limit_bytes=parse_bytes(args.memory_limit) if args.memory_limit else None,
                     out=out, cell_timeout_s=args.cell_timeout, data=args.data, packing=args.packing,
                     compile=args.compile, kernels=args.kernels, loss=args.loss, warmup_steps=args.warmup_steps,
                     time_budget_s=args.time_budget, sdpa=args.sdpa, command=command)
    from .plan import model_config

    model_config(args.model, args.layers)  # fail fast on a bad model name/path
    if args.find_max_seq_len:
        from .runner import find_max_seq_len

        found = find_max_seq_len(bc, max_probes=args.max_probes, rel_step=args.probe_step,
                                 probe_samples=args.probe_samples, probe_start=args.probe_start)
        return 0 if found.get("longest_fit") else 1
    results = run_bench(bc)
    return 0 if any(r["status"] == "ok" for r in results) else 1


def _parse_fix(items: tuple[str, ...]) -> dict[str, bool]:
    out = {}
    for item in items:
        name, _, val = item.partition("=")
        if val not in ("on", "off"):
            raise ValueError(f"--fix {item!r}: expected AXIS=on or AXIS=off")
        out[name] = val == "on"
    return out


def _bench_argv(args: argparse.Namespace, out: str) -> list[str]:
    from .cell import LOOP_OPTIONS

    argv = ["--model", args.model]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    argv += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
             "--axes", ",".join(args.axes),
             "--precision-on", args.precision_on]
    if args.fix:
        argv += ["--fix", ",".join(args.fix)]
    if args.reference:
        argv += ["--reference", args.reference]
    if args.time_budget:
        argv += ["--time-budget", f"{args.time_budget:g}"]
    for flag, value, default in (("--quantize", args.quantize, "none"), ("--offload", args.offload, "none"),
                                 ("--memory-limit", args.memory_limit, None), ("--optimizer", args.optimizer, "adamw"),
                                 ("--data", args.data, "alpaca-sample"),
                                 *((f"--{k}", getattr(args, k), v) for k, v in LOOP_OPTIONS.items())):
        if value != default:
            argv += [flag, str(value)]
    if args.optimizer_in_backward:
        argv += ["--optimizer-in-backward"]
    return argv + ["--out", out]


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama2-7b", help="architecture preset or checkpoint path (config only)")
    p.add_argument("--layers", type=int, default=None, help="override the depth")
    p.add_argument("--gpu-mem", required=True, help="memory to fit in, e.g. 24GiB, 80GB, 40G")
    p.add_argument("--host-mem", default=None,
                   help="host RAM the pinned copies of --offload must also fit in, e.g. 64GiB (default: not checked)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per example (plan for the longest)")
    p.add_argument("--batch", type=int, default=1, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--methods", type=_csv, default=None, help="lora,full (default both; --max-seq-len: lora)")
    p.add_argument("--precisions", type=_csv, default=None,
                   help=",".join(PRECISIONS) + " (default all; --max-seq-len: bf16)")
    p.add_argument("--checkpointing", type=_csv, default=None,
                   help="policies to consider (off, all, every:K; default off,every:4,every:2,all; --max-seq-len: all)")
    p.add_argument("--lora-rank", type=int, default=LoRASpec.rank)
    p.add_argument("--lora-targets", type=_csv, default=LoRASpec.targets)
    p.add_argument("--lora-dropout", type=float, default=LoRASpec.dropout)
    p.add_argument("--quantize", type=_csv, default=("none",),
                   help="frozen-base quantizations to consider: none,nf4,int8,fp8 (with lora only)")
    p.add_argument("--offload", type=lambda t: tuple(o.replace("+", ",") for o in _csv(t)), default=("none",),
                   help="offload options to consider: none,activations,optimizer,activations+optimizer")
    p.add_argument("--optimizer", default=None,
                   help="only this optimizer (adamw | adamw-8bit); default: LoRA with adamw, full fine-tuning with "
                        "each of adamw, adamw-8bit, 8-bit in backward, 8-bit with its state offloaded, and both")
    p.add_argument("--optimizer-in-backward", choices=["off", "on"], default=None,
                   help="full fine-tuning: only techniques with (on) or without (off) the optimizer in backward")
    p.add_argument("--loss", type=_csv, default=("full-logits",), help="losses to consider (train/loss.py)")
    p.add_argument("--compiled", action="store_true",
                   help="predict runs with compiled blocks and loss (finetune's CUDA default: the loss then keeps "
                        "its 16-bit logits, not an fp32 copy); default: the eager step, which holds more")
    p.add_argument("--max-seq-len", action="store_true",
                   help="the longest sequence that fits --gpu-mem at --batch (default 1) per configuration: a "
                        "bracket over seq_len narrowed with the planner's dry run (linear interpolation)")
    p.add_argument("--seq-len-step", type=int, default=128, help="--max-seq-len resolution (tokens)")
    p.add_argument("--seq-len-cap", type=int, default=1 << 20, help="--max-seq-len upper bound (tokens)")
    p.add_argument("--all", action="store_true", help="also list the configurations that do not fit")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import PRECISIONS as KNOWN
    from .plan import OFFLOAD_KINDS, QUANTIZE_KINDS, format_plan, model_config, parse_bytes, plan

    cfg = model_config(args.model, args.layers)
    gpu = parse_bytes(args.gpu_mem)
    host = parse_bytes(args.host_mem) if args.host_mem else None
    longest = args.max_seq_len
    args.methods = args.methods or (("lora",) if longest else ("lora", "full"))
    args.precisions = args.precisions or (("bf16",) if longest else KNOWN)
    args.checkpointing = args.checkpointing or (("all",) if longest else ("off", "every:4", "every:2", "all"))
    bad = [m for m in args.methods if m not in ("lora", "full")] + [q for q in args.precisions if q not in KNOWN]
    if bad:
        raise ValueError(f"unknown method/precision {bad}: methods lora,full; precisions {','.join(KNOWN)}")
    from ..errors import ConfigError
    from ..train.loss import LOSSES

    unknown = [x for x in args.loss if x not in LOSSES]
    if unknown:
        raise ConfigError(f"--loss {','.join(unknown)}: choose from {', '.join(LOSSES)}")
    bad = [q for q in args.quantize if q not in QUANTIZE_KINDS] + [o for o in args.offload if o not in OFFLOAD_KINDS]
    if bad:
        raise ValueError(f"unknown quantize/offload {bad}: quantize {','.join(QUANTIZE_KINDS)}; "
                         f"offload {','.join(OFFLOAD_KINDS)}")
    if longest:
        return _cmd_plan_longest(args, cfg, gpu, host)
    from .plan import FULL_FT_OPTIMIZERS
    from ..train.optim import get_optimizer_spec

    if args.optimizer is not None:
        get_optimizer_spec(args.optimizer)  # a ConfigError naming the choices
    techniques = tuple(t for t in FULL_FT_OPTIMIZERS
                       if args.optimizer in (None, t[0])
                       and args.optimizer_in_backward in (None, "on" if t[1] else "off"))
    if args.optimizer is not None and not techniques:  # an optimizer without curated techniques: plain
        techniques = ((args.optimizer, args.optimizer_in_backward == "on", False),)
    rows = plan(cfg, gpu, seq_len=args.seq_len, batch=args.batch, grad_accum=args.grad_accum,
                lora_rank=args.lora_rank, lora_targets=args.lora_targets, lora_dropout=args.lora_dropout,
                methods=args.methods, precisions=args.precisions, checkpointing=args.checkpointing,
                optimizer=args.optimizer or "adamw", quantize=args.quantize, offload=args.offload,
                full_optimizers=techniques, losses=args.loss, compiled=args.compiled, host_mem=host)
    if args.json:
        print(json.dumps([{**p.to_dict(), "relative_cost": c, "fits": f} for p, c, f in rows], indent=1))
    else:
        print(format_plan(rows, gpu, show_all=args.all, host_mem=host))
    return 0 if any(f for _, _, f in rows) else 1


def _cmd_plan_longest(args: argparse.Namespace, cfg, gpu: int, host: int | None) -> int:
    from .plan import format_longest, plan_longest

    lora = LoRASpec(rank=args.lora_rank, dropout=args.lora_dropout, targets=tuple(args.lora_targets))
    rows = plan_longest(cfg, gpu, batch=args.batch, lora=lora, methods=args.methods, precisions=args.precisions,
                        checkpointing=args.checkpointing, quantize=args.quantize, offload=args.offload,
                        losses=args.loss, optimizer=args.optimizer or "adamw", step=args.seq_len_step,
                        cap=args.seq_len_cap, compiled=args.compiled, host_mem=host)
    if args.json:
        print(json.dumps([{**r.to_dict(), "label": r.setup.label} for r in rows], indent=1))
    else:
        print(format_longest(rows, gpu, args.seq_len_step, host_mem=host))
    return 0 if any(r.seq_len for r in rows) else 1
