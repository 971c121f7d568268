"""Command-line wiring for ``solotune finetune``, ``eval``, ``merge`` and ``export-peft``.

``solotune finetune`` starts from a profile (default ``quickstart``: the no-argument run that
finishes in minutes on a CPU; ``--profile course`` for the course's settings), then applies the
flags you pass. With ``--resume DIR`` it starts from the checkpoint's own config instead, so
``solotune finetune --resume runs/x`` continues exactly the interrupted run, in ``runs/x``.

Output directories: a run is never deleted without ``--overwrite``. With no ``--output-dir`` the
profile's default is used, or, when that already holds a run, the first free ``DIR-2``, ``DIR-3``...;
an ``--output-dir`` you name that holds a run is refused (by the loop) with the resume/overwrite hint.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingPathError, RunDirError
from .config import GRAPH_MAX_TOKENS, PRECISIONS, PROFILES, QUANTIZE, TEMPLATES, TrainConfig


def _range(text: str) -> tuple[int, int]:
    """``"0:200"`` -> (0, 200)."""
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 0:200), got {text!r}") from None


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


_CLI_PRECISIONS = [p for p in PRECISIONS if p != "fp64"]

# flag -> (TrainConfig field, argparse kwargs). Defaults are never set here: a flag you do not pass
# leaves the profile's (or the resumed checkpoint's) value alone.
_FINETUNE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(help="preset name or checkpoint path (Meta dir, HF dir, .gguf)")),
    "--data": ("data", dict(help="alpaca-sample (bundled), a .json/.jsonl file, or an HF datasets id")),
    "--output-dir": ("output_dir", dict(help="where metrics, checkpoints and final/ go (default: the profile's; "
                                                 "the next free DIR-2, DIR-3 ... when that holds a run; with "
                                                 "--resume: the resumed run's dir)")),
    "--max-steps": ("max_steps", dict(type=_opt_int, help="optimizer steps (default: --epochs passes)")),
    "--epochs": ("epochs", dict(type=int)),
    "--lr": ("lr", dict(type=float, help="peak learning rate (default: the profile's for the method, see below)")),
    "--batch-size": ("batch_size", dict(type=int, help="examples per micro-batch")),
    "--grad-accum": ("grad_accum", dict(type=int, help="micro-batches per optimizer step")),
    "--grad-checkpoint": ("grad_checkpoint", dict(help="off | all | every:K")),
    "--precision": ("precision", dict(choices=_CLI_PRECISIONS)),
    "--lora-rank": ("lora_rank", dict(type=int, help="0 = full fine-tuning")),
    "--lora-alpha": ("lora_alpha", dict(type=float)),
    "--lora-dropout": ("lora_dropout", dict(type=float)),
    "--lora-targets": ("lora_targets", dict(help="comma list of wq,wk,wv,wo,w1,w2,w3")),
    "--quantize": ("quantize", dict(choices=list(QUANTIZE),
                                    help="store the frozen base in 4-bit NF4 (QLoRA) or int8, or in fp8 and multiply "
                                         "in fp8 (Hopper's fp8 GEMMs: speed, a 16-bit model's memory); LoRA only")),
    "--offload": ("offload", dict(help="none | activations (saved activations in pinned host memory; use with "
                                       "--grad-checkpoint) | optimizer (its state in pinned host memory) | "
                                       "activations,optimizer")),
    "--optimizer": ("optimizer", dict(help="adamw | adamw-8bit (blockwise 8-bit moments, ~2 bytes/parameter)")),
    "--optimizer-in-backward": ("optimizer_in_backward", dict(
        action="store_true", help="update each parameter in its gradient hook (no full gradients in memory); "
                                  "needs --grad-accum 1 and --max-grad-norm 0")),
    "--packing": ("packing", dict(choices=["auto", "off", "on"],
                                  help="on: pack each step's records into rows of --max-seq-len tokens (no padding; "
                                       "auto: on CUDA)")),
    "--compile": ("compile", dict(choices=["auto", "off", "blocks", "blocks-cudagraphs"],
                                  help="blocks: torch.compile each transformer block; blocks-cudagraphs: and replay them as "
                                       "CUDA graphs (launch-bound small micro-batches); auto: on CUDA, with graphs "
                                       f"at <= {GRAPH_MAX_TOKENS} tokens per micro-batch without checkpointing, quantization, "
                                       "offload or in-backward optimizer")),
    "--kernels": ("kernels", dict(choices=["off", "triton"], help="triton: fused RMSNorm/RoPE/SwiGLU kernels")),
    "--loss": ("loss", dict(help="how the head's logits come to exist (see solotune.train.loss.LOSSES)")),
    "--full": ("full", dict(action="store_true", help="full fine-tuning (no LoRA)")),
    "--weight-decay": ("weight_decay", dict(type=float)),
    "--warmup-steps": ("warmup_steps", dict(type=int)),
    "--lr-schedule": ("lr_schedule", dict(choices=["cosine", "constant"])),
    "--min-lr-ratio": ("min_lr_ratio", dict(type=float)),
    "--max-grad-norm": ("max_grad_norm", dict(type=float, help="0 = no clipping")),
    "--seed": ("seed", dict(type=int)),
    "--max-seq-len": ("max_seq_len", dict(type=int)),
    "--train-range": ("train_range", dict(type=_range, help="record indices START:STOP (default: auto, see below)")),
    "--val-range": ("val_range", dict(type=_range, help="record indices START:STOP (default: auto, see below)")),
    "--val-samples": ("val_samples", dict(type=_opt_int, help="first N records of the val range (all)")),
    "--max-samples": ("max_samples", dict(type=_opt_int, help="first N records of the train range (all)")),
    "--eval-batch-size": ("eval_batch_size", dict(type=int)),
    "--eval-every": ("eval_every", dict(type=int, help="val loss every N steps too (0 = before/after only)")),
    "--skip-bad-records": ("skip_bad_records", dict(action="store_true")),
    "--template": ("template", dict(choices=list(TEMPLATES),
                                    help="how records become tokens: alpaca prompt, the model's chat template "
                                         "(only assistant turns are labels), or auto: Alpaca records as alpaca, "
                                         "messages/ShareGPT conversations as chat when the model has a chat template")),
    "--tensorboard": ("tensorboard", dict(metavar="DIR", help="also write metrics.jsonl's scalars as TensorBoard "
                                                              "events to DIR (needs the tensorboard package)")),
    "--save-every": ("save_every", dict(type=int, help="checkpoint every N steps (0 = only at the end)")),
    "--save-every-minutes": ("save_every_minutes", dict(type=float, help="also checkpoint after this many minutes of training since the last checkpoint (0 = off)")),
    "--keep-checkpoints": ("keep_checkpoints", dict(type=int, help="keep the newest N checkpoints (0 = all)")),
    "--resume": ("resume", dict(metavar="DIR", help="an output dir (its latest checkpoint) or a checkpoint folder")),
    "--overwrite": ("overwrite", dict(action="store_true", help="start over in an output dir holding a run")),
    "--device": ("device", dict(help="auto | cpu | cuda | cuda:N")),
    "--distributed": ("distributed", dict(choices=["none", "fsdp"],
                                          help="fsdp: shard model and optimizer over the processes of "
                                               "`torchrun --nproc-per-node N -m solotune finetune ...`; "
                                               "--batch-size is then the global micro-batch")),
    "--random-init": ("random_init", dict(action="store_true", help="random weights of the named architecture")),
    "--n-layers": ("n_layers", dict(type=int, help="keep the first N layers (with --random-init)")),
    "--log-every": ("log_every", dict(type=int)),
}


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="starting point for every setting you do not pass (default: quickstart, the no-argument "
                        "demo; course: lr 1e-5, 512 tokens, all 100 val records)")
    p.add_argument("--config", metavar="JSON", help="a TrainConfig JSON file (instead of a profile)")
    for flag, (dest, kw) in _FINETUNE_FLAGS.items():
        p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **kw)
    p.add_argument("--no-generate", dest="generate_samples", action="store_false", default=argparse.SUPPRESS,
                   help="skip the before/after sample generations")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="log lines instead of a progress bar")
    p.add_argument("--no-save", dest="save", action="store_false", default=argparse.SUPPRESS,
                   help="write no checkpoints and no final/ (benchmarks)")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _profiles_text()


def _profiles_text() -> str:
    """The values behind every flag you do not pass, per profile (for --help)."""
    names = ("quickstart", "course")
    lora = [TrainConfig.profile(n) for n in names]
    full = [TrainConfig.profile(n, full=True) for n in names]
    shown = ("model", "data", "output_dir", "max_steps", "epochs", "lr", "warmup_steps", "lr_schedule", "batch_size",
             "grad_accum", "precision", "grad_checkpoint", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
             "max_seq_len", "train_range", "val_range", "val_samples", "eval_every", "weight_decay", "max_grad_norm", "seed")
    rows = [f"  {'setting':<16}{'quickstart (default)':<24}course"]
    for f in shown:
        if f == "lr":  # per method: LoRA's rate would wreck a full fine-tune
            a, b = (f"{lo.lr:g} (full {fu.lr:g})" for lo, fu in zip(lora, full))
        else:
            a, b = (_fmt(f, getattr(c, f)) for c in lora)
        rows.append(f"  {f:<16}{a:<24}{b}{'' if a == b else '   <-'}")
    return ("defaults by profile (flags you pass override them):\n" + "\n".join(rows) + "\n\n"
            "lr: LoRA's rate, and in brackets the rate used with --full / --lora-rank 0 unless you pass --lr.\n"
            "train_range / val_range auto: on alpaca-sample records 0:200 / 400:500; on your own data the last 5%\n"
            "  of the records (at least one) validate and the rest train.\n"
            "output_dir: when you pass no --output-dir and it already holds a run, the run goes to the first free\n"
            "  DIR-2, DIR-3 ... instead; a run is only ever deleted with --overwrite.")


def _fmt(f: str, v: Any) -> str:
    if v is None and f.endswith("_range"):
        return "auto"
    if f == "lora_targets":
        return ",".join(v)
    return f"{v[0]}:{v[1]}" if f.endswith("_range") else str(v)


def finetune_config(args: argparse.Namespace, say=print) -> TrainConfig:
    """Profile / config file / resumed checkpoint's config, then the flags actually given.

    ``--resume`` without ``--output-dir`` continues in the resumed run's directory (absolute), not
    in the output_dir its checkpoint recorded (relative to wherever it was started, or the original
    of a copied run dir). ``say`` reports a default output dir that had to move (see module doc).
    """
    given = {dest: getattr(args, dest) for dest, _ in _FINETUNE_FLAGS.values() if hasattr(args, dest)}
    for dest in ("generate_samples", "progress", "save"):
        if hasattr(args, dest):
            given[dest] = getattr(args, dest)
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    if args.profile is not None and args.config is not None:
        raise ConfigError("pass either --profile or --config, not both")
    if given.get("resume"):
        ckpt, run_dir = resume_paths(given["resume"])
        given.setdefault("output_dir", str(run_dir))
        if args.profile is None and args.config is None:
            return TrainConfig.from_dict({**_saved_config(ckpt), **given})
    if args.config:
        return TrainConfig.from_dict({**TrainConfig.from_json_file(args.config).to_dict(), **given})
    cfg = TrainConfig.profile(args.profile or "quickstart", **given)
    if "output_dir" not in given and not cfg.overwrite and holds_run(Path(cfg.output_dir)):
        cfg = cfg.replace(output_dir=_next_free_dir(cfg.output_dir, say))
    return cfg


def resume_paths(arg: str) -> tuple[Path, Path]:
    """``--resume`` argument -> (checkpoint folder, absolute run dir). The argument is a run's
    output dir (its latest checkpoint) or one checkpoint folder ``RUN/checkpoints/step-N``."""
    from .state import resolve_checkpoint

    p = Path(arg)
    if not p.exists():
        raise MissingPathError(f"--resume {p}: no such directory")
    if not p.is_dir():
        raise RunDirError(f"--resume {p}: is a file; pass a run's output dir or one of its checkpoint folders")
    try:
        ckpt = resolve_checkpoint(p)
    except FileNotFoundError as e:  # a directory without checkpoints; the message says where it looked
        raise MissingPathError(str(e)) from None
    run_dir = ckpt.parent.parent if ckpt == p else p
    return ckpt, run_dir.resolve()


def _saved_config(ckpt: Path) -> dict[str, Any]:
    from .state import CONFIG

    try:
        saved = json.loads((ckpt / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{ckpt / CONFIG}: cannot read the run's config: {e}") from None
    saved.pop("resume", None)
    return saved


def holds_run(d: Path) -> bool:
    """Whether ``d`` holds (part of) a run: a checkpoint, summary.json or metrics.jsonl."""
    from .metrics import METRICS, SUMMARY
    from .state import list_checkpoints

    return d.is_dir() and (bool(list_checkpoints(d)) or (d / SUMMARY).is_file() or (d / METRICS).is_file())


def _next_free_dir(taken: str, say) -> str:
    """The first ``TAKEN-2``, ``TAKEN-3`` ... that holds no run (and is not a file)."""
    n = 2
    while holds_run(Path(f"{taken}-{n}")) or Path(f"{taken}-{n}").is_file():
        n += 1
    free = f"{taken}-{n}"
    say(f"{taken} holds an earlier run, so this one goes to {free} (--resume {taken} continues that one, "
        f"--output-dir DIR picks another place)")
    return free


def cmd_finetune(args: argparse.Namespace) -> int:
    from .loop import finetune
    from .metrics import require_tensorboard

    cfg = finetune_config(args)
    if cfg.tensorboard:  # before the model loads: a missing optional package costs no loading time
        require_tensorboard()
    finetune(cfg)
    return 0


# ------------------------------------------------------------------------- model + adapter arguments
def add_model_args(p: argparse.ArgumentParser, *, adapter_required: bool = False,
                   precision: str | None = "fp32") -> None:
    """The model arguments ``eval``, ``generate`` and ``merge`` share: --model, --adapter,
    --tokenizer, --device and (unless ``precision`` is None) --precision with that default."""
    p.add_argument("--model", default=None,
                   help="base model: preset or checkpoint path (default: the adapter's base, else smollm2-135m)")
    p.add_argument("--adapter", required=adapter_required, default=None,
                   help="LoRA adapter: a run's output dir, its final/, a checkpoint folder, or a PEFT folder")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or dir when the model folder has none (e.g. the base .gguf)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    if precision is not None:
        p.add_argument("--precision", choices=["auto", *_CLI_PRECISIONS], default=precision,
                       help=f"weights and compute, as in finetune (auto: bf16 on CUDA, fp32 on CPU; default {precision})")


def resolve_precision(name: str, device: Any) -> str:
    """``--precision auto`` -> bf16 on CUDA, fp32 elsewhere; any other name unchanged."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" else "fp32"


def _load_base(args: argparse.Namespace, dtype: Any, default: str | None = None, quantize: str = "none"):
    """(model, tokenizer) from --model (else ``default``, else smollm2-135m) and --tokenizer;
    ``quantize``: the base as a QLoRA/int8 adapter was trained on (quantization is deterministic)."""
    import torch

    from ..api import load, materialize, resolve_device

    name = args.model or default or "smollm2-135m"
    device = resolve_device(args.device)
    if args.tokenizer is None:
        return load(name, dtype=dtype, device=device, quantize=quantize)
    from ..checkpoint import load_checkpoint
    from ..tokenizer import load_tokenizer

    if not Path(name).exists():  # a preset: its own tokenizer is replaced by --tokenizer
        return load(name, dtype=dtype, device=device, quantize=quantize)[0], load_tokenizer(args.tokenizer)
    ckpt = load_checkpoint(name)
    with torch.no_grad():
        model = materialize(ckpt.config, ckpt.tensors(), dtype, device, None, quantize)
    return model.eval(), load_tokenizer(args.tokenizer)


def model_and_adapter(args: argparse.Namespace, dtype: Any):
    """(model with the adapter attached or None, tokenizer, adapter). The adapter's recorded base
    model is the default for --model; a PEFT folder is read against the loaded base's config."""
    from .weights import attach_adapter, load_adapter

    if args.adapter and not Path(args.adapter).is_dir():
        raise MissingPathError(f"--adapter {args.adapter}: no such directory (a run's output dir, its final/, "
                               f"a checkpoint folder or a PEFT folder)")
    asked = getattr(args, "quantize", None)  # generate --quantize: the base quantized for inference
    if not args.adapter:
        model, tok = _load_base(args, dtype, quantize=asked or "none")
        return model, tok, None
    peft_conf = Path(args.adapter) / "adapter_config.json"
    if peft_conf.is_file():
        base = json.loads(peft_conf.read_text()).get("base_model_name_or_path")
        model, tok = _load_base(args, dtype, base, asked or "none")
        adapter = load_adapter(args.adapter, model.config)
    else:
        adapter = load_adapter(args.adapter)
        trained = quantized_base_of(adapter)
        if asked not in (None, trained) and trained != "none":
            raise ConfigError(f"--quantize {asked}: this adapter was trained over a {trained} base; its weights "
                              f"are only right over that base (leave --quantize out)")
        model, tok = _load_base(args, dtype, adapter.base_model, asked or trained)
    attach_adapter(model, adapter, dropout=0.0)
    return model, tok, adapter


def quantized_base_of(adapter: Any) -> str:
    """The quantized base the adapter was trained over (``nf4``, ``fp8``, ...: ``TrainConfig.quantize``), else ``none``."""
    return str((adapter.train_config or {}).get("quantize", "none"))


# ------------------------------------------------------------------------------------------ eval
def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, precision="fp32")
    p.add_argument("--data", default=None, help="default: the adapter's training data, else alpaca-sample")
    p.add_argument("--val-range", type=_range, default=None,
                   help="record indices START:STOP (default: the adapter run's; else 400:500 on alpaca-sample, "
                        "the last 5%% of other data)")
    p.add_argument("--val-samples", type=_opt_int, default=None, help="first N records of the range")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--template", choices=list(TEMPLATES), default=None,
                   help="how records become tokens (default: the adapter run's, else auto; see finetune --help)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation loss and perplexity of a model (+ adapter) on a record range. Defaults come from
    the adapter's training run when it has one, so the numbers match that run's summary."""
    from ..api import resolve_device
    from ..data import DataError
    from .loop import evaluate
    from .precision import get_policy

    device = resolve_device(args.device)
    policy = get_policy(resolve_precision(args.precision, device))
    model, tokenizer, adapter = model_and_adapter(args, policy.param_dtype)
    ds, data, val_range, max_len = eval_set(args, adapter, tokenizer)
    loss = evaluate(model, ds, policy, device, args.batch_size, int(getattr(tokenizer, "pad_id", tokenizer.eos_id)))
    if loss is None:
        raise DataError(f"{data}: records {val_range.start}:{val_range.stop} leave no target token to evaluate on "
                        f"(all cut at --max-seq-len {max_len}?)")
    out = {"val_loss": loss, "perplexity": math.exp(loss), "records": len(ds), "target_tokens": ds.num_target_tokens,
           "truncated": ds.num_truncated, "data": data, "val_range": [val_range.start, val_range.stop],
           "max_seq_len": max_len, "model": args.model or (adapter.base_model if adapter else "smollm2-135m"),
           "adapter": str(adapter.source) if adapter else None}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"val loss {loss:.4f}  perplexity {math.exp(loss):.3f}  ({len(ds)} records "
              f"{val_range.start}:{val_range.stop} of {data}, {ds.num_target_tokens} target tokens, "
              f"{ds.num_truncated} truncated at {max_len})")
    return 0


def eval_set(args: argparse.Namespace, adapter: Any, tokenizer: Any) -> tuple[Any, str, range, int]:
    """(examples, data, val range, max_seq_len) that ``eval`` (and ``compare``) score: --data /
    --val-range / --val-samples / --max-seq-len, defaulting to the adapter's training run's."""
    from ..data import load_records, tokenized
    from .inputs import auto_ranges, split_records

    run = TrainConfig.from_dict(adapter.train_config) if adapter and adapter.train_config else TrainConfig()
    data = args.data or run.data
    records = load_records(data, skip_bad=run.skip_bad_records)
    # The run's own val range only applies to the run's data; otherwise: auto for this data.
    _, val_range = auto_ranges(data, records.total, None, args.val_range or (run.val_range if data == run.data else None))
    n = args.val_samples if args.val_samples is not None else (run.val_samples if args.val_range is None else None)
    if n is not None:
        val_range = val_range[:n]
    _, val = split_records(records, data, train=range(0), val=val_range)
    max_len = args.max_seq_len or run.max_seq_len
    template = getattr(args, "template", None) or run.template
    return tokenized(val, tokenizer, max_len, template), data, val_range, max_len


# ----------------------------------------------------------------------------------------- merge
def add_merge_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, adapter_required=True, precision=None)
    p.add_argument("--output", required=True, help="directory for the merged HF checkpoint (--format gguf: the .gguf file)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the written weights")
    p.add_argument("--max-shard-bytes", type=int, default=None)
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: safetensors + tokenizer files; gguf: one llama.cpp file with the tokenizer and chat template")
    p.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="with --format gguf: type of the 2-D weights (norms stay f32; default f16)")


def cmd_merge(args: argparse.Namespace) -> int:
    """Base + adapter -> merged weights in HF safetensors (+ tokenizer): ``transformers`` and
    ``solotune.load`` both read the result. Merged in fp32, rounded once to ``--dtype``.
    ``--format gguf``: one llama.cpp file instead (``checkpoint.gguf_write``), rounded once to ``--gguf-type``."""
    import torch

    from ..checkpoint.hf import save_hf
    from ..peft import merge_lora
    from .weights import trainable_state, write_tokenizer

    if getattr(args, "format", "hf") == "gguf" and Path(args.output).suffix != ".gguf":
        raise ConfigError(f"--output {args.output}: with --format gguf, name the .gguf file to write (e.g. merged.gguf)")
    model, tokenizer, adapter = model_and_adapter(args, torch.float32)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if getattr(args, "format", "hf") == "gguf":
        dtype = torch.float32  # --gguf-type does the one rounding
    if quantized_base_of(adapter) != "none":
        # QLoRA: the adapter learned against the dequantized base, so that is what gets merged
        # (dequantize + delta in fp32, one rounding to --dtype); 4 bits cannot hold the sum.
        from ..checkpoint.common import strip_tied
        from ..quant import dense_state_dict

        sd = strip_tied(dict(dense_state_dict(model, dtype)), model.config)
    else:
        merge_lora(model)
        sd = {k: v.to(dtype) for k, v in trainable_state(model, lora=False).items()}
    if args.format == "gguf":  # merged in fp32 above; write_gguf rounds once to --gguf-type
        from ..checkpoint.gguf_write import write_gguf

        out = write_gguf(model.config, sd, args.output, args.gguf_type, tokenizer)
        print(f"merged {adapter.source} into {args.model or adapter.base_model} -> {out} (GGUF {args.gguf_type}, "
              f"tokenizer{' and chat template' if tokenizer.chat_template else ''} in its metadata)")
        return 0
    out = save_hf(model.config, sd, args.output, max_shard_bytes=args.max_shard_bytes)
    has_tok = write_tokenizer(tokenizer, out)
    print(f"merged {adapter.source} into {args.model or adapter.base_model} -> {out} ({args.dtype}"
          f"{', tokenizer included' if has_tok else ', no tokenizer file: pass the base tokenizer when loading'})")
    return 0


# ----------------------------------------------------------------------------------- export-peft
def add_export_peft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="a run's output dir, its final/, or a checkpoint folder")
    p.add_argument("--output", required=True, help="directory for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--model", default=None, help="base model (default: the adapter's base); only its config is used")
    p.add_argument("--base-model-name-or-path", default=None,
                   help="value written to adapter_config.json (default: the base model string)")


def cmd_export_peft(args: argparse.Namespace) -> int:
    """Write a solotune adapter in the HF PEFT layout, loadable with ``PeftModel.from_pretrained``."""
    import torch

    from ..config import ModelConfig
    from ..model import Transformer
    from ..peft import export_peft
    from .weights import ADAPTER_CONFIG, attach_adapter, load_adapter

    adapter = load_adapter(args.adapter)
    base = args.model or adapter.base_model
    recorded = adapter.source / ADAPTER_CONFIG
    shape = json.loads(recorded.read_text()).get("model_config") if recorded.is_file() and args.model is None else None
    if shape:  # the adapter records its model's shape: build it on the meta device, no base weights needed
        cfg = ModelConfig(**shape)
        with torch.device("meta"):
            model = Transformer(cfg)
        _attach_on_meta(model, adapter)
    else:
        from ..api import load

        model = load(base, dtype=torch.float32, device="cpu")[0]
        cfg = model.config
        attach_adapter(model, adapter)  # keep the training dropout: PEFT records it in adapter_config.json
    out = export_peft(model, cfg, args.output, dropout=None, base_model_name_or_path=args.base_model_name_or_path or base)
    print(f"exported {adapter.source} -> {out} (PEFT LoRA r={adapter.rank}, alpha={adapter.alpha:g}, "
          f"targets {','.join(adapter.targets)})")
    return 0


def _attach_on_meta(model: Any, adapter: Any) -> None:
    """Wrap a meta-device model's targets and assign the adapter tensors as the LoRA parameters
    (only the adapters are real: enough for export, which reads nothing else)."""
    import torch

    from ..checkpoint.common import CheckpointError
    from ..peft import apply_lora, lora_modules

    apply_lora(model, adapter.targets, adapter.rank, adapter.alpha, adapter.dropout)
    for name, m in lora_modules(model):
        for ab in ("a", "b"):
            key = f"{name}.lora_{ab}"
            if key not in adapter.weights:
                raise CheckpointError(adapter.source, f"adapter has no tensor {key}")
            setattr(m, f"lora_{ab}", torch.nn.Parameter(adapter.weights[key].float(), requires_grad=False))
