"""``solotune compare --adapter RUN``: did tuning help? The base model and base + adapter, side by
side: greedy answers to a prompt file (default :data:`COMPARE_PROMPTS`) and the validation loss of
both on the run's validation records (or ``--data``). One model in memory: the base answers are
the same model inside :func:`solotune.peft.lora_disabled`. The report is printed and written
atomically as ``compare.md`` in the run's directory (``--output`` elsewhere)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data import Record
from ..data import DataError
from ..errors import MissingPathError

# Instructions written for this report: none is an Alpaca record, so none is in any training split
# of the bundled sample (tests/train/test_compare.py checks it).
COMPARE_PROMPTS: tuple[Record, ...] = (
    Record(instruction="Give two tips for staying focused while studying.", output=""),
    Record(instruction="Translate the sentence into French.", input="The library opens at nine.", output=""),
    Record(instruction="What is the boiling point of water at sea level in Celsius?", output=""),
    Record(instruction="Write a haiku about autumn rain.", output=""),
    Record(instruction="Summarize the text in one sentence.",
           input="Solar panels turn sunlight into electricity. They are quiet, need little upkeep and "
                 "have become much cheaper over the last decade.", output=""),
    Record(instruction="List three animals that live in the ocean.", output=""),
)
COMPARE_MD = "compare.md"


@dataclass
class Comparison:
    """What the report shows: per prompt the two answers; the two validation losses (None: no target token
    to score)."""

    prompts: list[Record]
    base_answers: list[str]
    tuned_answers: list[str]
    base_loss: float | None
    tuned_loss: float | None
    val_note: str
    title: str


def add_compare_args(p: argparse.ArgumentParser) -> None:
    from .commands import _opt_int, _range, add_model_args

    add_model_args(p, adapter_required=True, precision="fp32")
    p.add_argument("--prompts", default=None,
                   help="a .txt file (one instruction per line) or Alpaca .json/.jsonl records "
                        "(default: six fixed instructions that are in no training split)")
    p.add_argument("--data", default=None, help="validation records (default: the run's data and val range)")
    p.add_argument("--val-range", type=_range, default=None, help="record indices START:STOP (default: the run's)")
    p.add_argument("--val-samples", type=_opt_int, default=None, help="first N records of the range")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--output", default=None, help=f"report path (default: {COMPARE_MD} in the adapter's run dir)")


def read_prompts(path: str | None) -> list[Record]:
    """--prompts -> Records: a text file's non-empty lines as instructions, or Alpaca records."""
    if path is None:
        return list(COMPARE_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"--prompts {p}: no such file")
    if p.suffix in (".json", ".jsonl"):
        from ..data import load_records

        recs = list(load_records(p))
    else:
        recs = [Record(instruction=line.strip(), output="") for line in p.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    if not recs:
        raise DataError(f"--prompts {p}: holds no prompt")
    return recs


def run_dir_of(adapter: Path) -> Path:
    """The run directory of ``--adapter``: itself, or the run above its ``final/`` or
    ``checkpoints/step-N`` (the nearest folder with a summary.json / metrics.jsonl); else itself."""
    from .metrics import METRICS, SUMMARY

    for d in (adapter, adapter.parent, adapter.parent.parent):
        if (d / SUMMARY).is_file() or (d / METRICS).is_file():
            return d
    return adapter


def cmd_compare(args: argparse.Namespace) -> int:
    from ..api import resolve_device
    from .commands import model_and_adapter, resolve_precision
    from .precision import get_policy

    device = resolve_device(args.device)
    policy = get_policy(resolve_precision(args.precision, device))
    prompts = read_prompts(args.prompts)
    model, tokenizer, adapter = model_and_adapter(args, policy.param_dtype)
    comp = compare(model, tokenizer, adapter, args, prompts, policy, device)
    text = render(comp)
    out = Path(args.output) if args.output else run_dir_of(Path(args.adapter)) / COMPARE_MD
    from ..checkpoint.common import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {out}")
    return 0


def compare(model: Any, tokenizer: Any, adapter: Any, args: argparse.Namespace, prompts: Sequence[Record],
            policy: Any, device: Any) -> Comparison:
    """Greedy answers and validation loss, first with the adapter disabled, then with it on."""
    from ..data import format_prompt
    from ..generate import generate
    from ..peft import lora_disabled
    from .commands import eval_set
    from .loop import evaluate

    ds, data, val_range, max_len = eval_set(args, adapter, tokenizer)
    pad = int(getattr(tokenizer, "pad_id", tokenizer.eos_id))
    texts = [format_prompt(r) for r in prompts]

    def run() -> tuple[list[str], float | None]:
        with policy.autocast(device.type):
            answers = generate(model, tokenizer, texts, max_new_tokens=args.max_new_tokens, temperature=0.0,
                               stop=["###"])
        return [a.strip() for a in answers], evaluate(model, ds, policy, device, args.batch_size, pad)

    with lora_disabled(model):
        base_answers, base_loss = run()
    tuned_answers, tuned_loss = run()
    note = (f"{len(ds)} records {val_range.start}:{val_range.stop} of {data}, {ds.num_target_tokens} target tokens, "
            f"max {max_len} tokens")
    title = (f"base `{args.model or adapter.base_model}` vs base + adapter `{args.adapter}` "
             f"(LoRA r={adapter.rank} on {','.join(adapter.targets)}); greedy, at most {args.max_new_tokens} new tokens")
    return Comparison(list(prompts), base_answers, tuned_answers, base_loss, tuned_loss, note, title)


def _cell(text: str) -> str:
    """One markdown table cell: pipes escaped, line breaks as <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def render(c: Comparison) -> str:
    """The compare.md text: a loss table and a base | tuned answer table."""
    def f(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    def delta(a: float | None, b: float | None, spec: str) -> str:
        return "n/a" if a is None or b is None else format(b - a, "+" + spec)

    ppl = [None if x is None else math.exp(x) for x in (c.base_loss, c.tuned_loss)]
    lines = ["# solotune compare", "", c.title, "", f"## Validation loss ({c.val_note})", "",
             "| | base | tuned | change |", "|---|---|---|---|",
             f"| loss | {f(c.base_loss, '.4f')} | {f(c.tuned_loss, '.4f')} | {delta(c.base_loss, c.tuned_loss, '.4f')} |",
             f"| perplexity | {f(ppl[0], '.2f')} | {f(ppl[1], '.2f')} | {delta(ppl[0], ppl[1], '.2f')} |",
             "", "## Answers", "", "| prompt | base | tuned |", "|---|---|---|"]
    for r, a, b in zip(c.prompts, c.base_answers, c.tuned_answers):
        prompt = r.instruction + (f" — {r.input}" if r.input else "")
        lines.append(f"| {_cell(prompt)} | {_cell(a)} | {_cell(b)} |")
    return "\n".join(lines) + "\n"
