"""``solotune`` command line: each subcommand's arguments and body live next to the code they drive.

A problem the user can fix (any :class:`solotune.errors.SolotuneError`) ends the command with one
line ``solotune CMD: error: MESSAGE`` on stderr and exit status 2, like argparse's own errors;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

# subcommand -> (module, add-arguments function, run function, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "finetune": ("solotune.train.commands", "add_finetune_args", "cmd_finetune",
                 "instruction-tune a model (no arguments: LoRA on the embedded SmolLM2-135M, bundled Alpaca sample, CPU)"),
    "generate": ("solotune.cli", "add_generate_args", "cmd_generate",
                 "generate text from a prompt (a model, or a model with a LoRA adapter attached)"),
    "eval": ("solotune.train.commands", "add_eval_args", "cmd_eval", "validation loss and perplexity"),
    "merge": ("solotune.train.commands", "add_merge_args", "cmd_merge",
              "merge a LoRA adapter into its base model and write HF safetensors or one GGUF file"),
    "compare": ("solotune.train.compare", "add_compare_args", "cmd_compare",
                "base vs tuned: greedy answers side by side and both validation losses (writes compare.md)"),
    "export-peft": ("solotune.train.commands", "add_export_peft_args", "cmd_export_peft",
                    "write a trained adapter in the HF PEFT layout"),
    "bench": ("solotune.bench.commands", "add_bench_args", "cmd_bench",
              "measure peak memory / runtime / anatomy over a matrix of techniques"),
    "plan": ("solotune.bench.commands", "add_plan_args", "cmd_plan",
             "predict which configurations fit in a given GPU memory"),
}


COMPILE_AUTO_MIN_TOKENS = 256  # --compile's default: ~30 ms saved per token (benchmarks/NOTES.md) vs seconds to compile


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from .train.commands import add_model_args

    add_model_args(p, precision="auto")  # --model --adapter --tokenizer --device --precision, as eval
    p.add_argument("--dtype", dest="precision", type=_dtype_alias, help=argparse.SUPPRESS)  # the older spelling
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (CUDA graphs on CUDA); default: on for CUDA when "
                        f"--max-new-tokens >= {COMPILE_AUTO_MIN_TOKENS}, where the compile time pays back")
    p.add_argument("--quantize", choices=["none", "int8", "nf4"], default=None,
                   help="store the base's block linears quantized for generation: int8 (per-channel, weight-only; "
                        "a compiled decode step reads about half the bytes per token of bf16) or nf4; default: "
                        "the adapter's base as it was trained, else none")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def _dtype_alias(text: str) -> str:
    """``--dtype`` (before --precision): fp32/bf16 are the same; fp16 weights become fp16 autocast."""
    aliases = {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16-amp"}
    if text not in aliases:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(aliases)})")
    return aliases[text]


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a model, or from a model with a LoRA adapter attached (not merged)."""
    from .api import resolve_device
    from .generate import Decoder, generate
    from .train.commands import model_and_adapter, resolve_precision
    from .train.precision import get_policy

    device = resolve_device(args.device)
    policy = get_policy(resolve_precision(args.precision, device))
    model, tokenizer, _adapter = model_and_adapter(args, policy.param_dtype)
    compile_ = args.compile
    if compile_ is None:  # auto: where it pays, and falling back to eager decoding if it cannot compile
        compile_ = device.type == "cuda" and args.max_new_tokens >= COMPILE_AUTO_MIN_TOKENS
    if compile_ and args.num_beams == 1 and not args.no_kv_cache:
        model = Decoder(model, compile=True, fallback=args.compile is None)
    with policy.autocast(device.type):
        texts = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         num_beams=args.num_beams, length_penalty=args.length_penalty,
                         kv_cache=not args.no_kv_cache, chat=args.chat, stop=args.stop, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solotune", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    for name, (module, add_fn, _run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        getattr(importlib.import_module(module), add_fn)(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # the embedded default: fine-tune SmolLM2-135M on the bundled Alpaca sample
        argv = ["finetune"]
    args = build_parser().parse_args(argv)
    module, _add, run_fn, _help = COMMANDS[args.command]
    run: Callable[[argparse.Namespace], int | None] = getattr(importlib.import_module(module), run_fn)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt as stop:  # a training run saved its checkpoint first (train/interrupts.py)
        from .train.interrupts import Terminated

        if isinstance(stop, Terminated):
            print("terminated", file=sys.stderr)
            return 143  # 128 + SIGTERM, what a scheduler expects
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise  # a bug: the traceback is the report
        print(f"solotune {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _is_user_error(e: BaseException) -> bool:
    from .errors import SolotuneError

    return isinstance(e, SolotuneError)


def _one_line(e: BaseException) -> str:
    """The message on one line (a multi-line message, e.g. pip's output in a fetch error, is joined)."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


if __name__ == "__main__":
    raise SystemExit(main())
