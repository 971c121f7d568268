"""``solotune`` command line: each subcommand's arguments and body live next to the code they drive."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from .errors import SolotuneError

# subcommand -> (module, add-arguments function, run function, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "finetune": ("solotune.train.commands", "add_finetune_args", "cmd_finetune",
                 "instruction-tune a model (no arguments: LoRA on the embedded SmolLM2-135M, bundled Alpaca sample, CPU)"),
    "generate": ("solotune.cli", "add_generate_args", "cmd_generate", "generate text from a prompt"),
    "eval": ("solotune.train.commands", "add_eval_args", "cmd_eval", "validation loss and perplexity"),
    "merge": ("solotune.train.commands", "add_merge_args", "cmd_merge",
              "merge a LoRA adapter into its base model and write HF safetensors"),
    "export-peft": ("solotune.train.commands", "add_export_peft_args", "cmd_export_peft",
                    "write a trained adapter in the HF PEFT layout"),
    "bench": ("solotune.bench.commands", "add_bench_args", "cmd_bench",
              "measure peak memory / runtime / anatomy over a matrix of techniques"),
    "plan": ("solotune.bench.commands", "add_plan_args", "cmd_plan",
             "predict which configurations fit in a given GPU memory"),
}


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path (Meta dir, HF dir, .gguf) or preset")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .api import load, resolve_device
    from .generate import generate

    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    model, tokenizer = load(args.model, dtype=getattr(torch, DTYPES[dtype_name]), device=device)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SolotuneError, ValueError, FileNotFoundError, KeyError) as e:
        # Bad input: one clear line, no traceback.
        print(f"solotune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
