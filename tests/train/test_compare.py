"""``solotune compare``: the report's losses are eval's numbers for the base and the tuned model, its
base answers are the base model's own greedy answers, and it lands atomically in the run dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solotune import cli
from solotune.data import format_prompt
from solotune.train.compare import COMPARE_MD, COMPARE_PROMPTS

from cli_fixtures import base, common_flags, data  # noqa: F401  (module fixtures)

FLAGS = ["--max-new-tokens", "6", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert cli.main(["finetune", *common_flags(base, data, out), "--max-steps", "4"]) == 0
    return out


def _rows(md: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table under ``## header``."""
    part = md.split(f"## {header}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]


def test_report_matches_eval_and_generate(run, base, capsys):
    capsys.readouterr()
    assert cli.main(["compare", "--adapter", str(run), *FLAGS]) == 0
    printed = capsys.readouterr().out
    md = (run / COMPARE_MD).read_text()
    assert md in printed and not list(run.glob(f".{COMPARE_MD}.tmp-*"))
    summary = json.loads((run / "summary.json").read_text())
    loss = _rows(md, "Validation loss")[0]
    assert loss[0] == "loss"
    assert float(loss[1]) == pytest.approx(summary["val_loss_before"], abs=1e-4)  # the base model
    assert float(loss[2]) == pytest.approx(summary["val_loss"], abs=1e-4)  # base + adapter
    answers = _rows(md, "Answers")
    assert len(answers) == len(COMPARE_PROMPTS)
    # the base column is what the base model alone answers
    r = COMPARE_PROMPTS[0]
    assert cli.main(["generate", "--model", str(base), "--prompt", format_prompt(r), "--precision", "fp32",
                     "--stop", "###", *FLAGS]) == 0
    assert answers[0][1] == (capsys.readouterr().out.strip() or "*(empty)*")
    assert any(b != t for _, b, t in answers)  # the adapter changes some answer: the columns are not one model


def test_prompt_file_and_errors(run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\n\nCount to three.\n")
    out = tmp_path / "report.md"
    assert cli.main(["compare", "--adapter", str(run), "--prompts", str(prompts), "--output", str(out),
                     "--val-samples", "4", *FLAGS]) == 0
    md = out.read_text()
    assert [row[0] for row in _rows(md, "Answers")] == ["Say hi.", "Count to three."]
    assert "4 records" in md
    capsys.readouterr()
    assert cli.main(["compare", "--adapter", str(run), "--prompts", str(tmp_path / "none.txt"), *FLAGS]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_report_goes_to_the_run_dir(run):
    from solotune.train.compare import run_dir_of

    assert run_dir_of(run / "final") == run_dir_of(run / "checkpoints" / "step-000004") == run_dir_of(run) == run


def test_default_prompts_are_in_no_training_split(alpaca_records):
    seen = {r["instruction"].strip().lower() for r in alpaca_records}
    assert not seen & {r.instruction.strip().lower() for r in COMPARE_PROMPTS}


def test_demo_summary_points_at_compare():
    from solotune.train.metrics import format_summary

    s = {"model": "m", "mode": "LoRA r=8 on wq,wv", "precision": "fp32", "grad_checkpoint": "off",
         "trainable_params": 1, "total_params": 10, "steps": 1, "tokens": 1, "target_tokens": 1, "skipped_steps": 0,
         "peak_memory_bytes": 1, "peak_memory_kind": "rss", "runtime_s": 1.0, "tokens_per_s": 1.0,
         "total_runtime_s": 1.0, "output_dir": "runs/quickstart", "final_dir": "runs/quickstart/final"}
    assert "solotune compare --adapter runs/quickstart" in format_summary(s)
    assert "compare" not in format_summary({**s, "mode": "full"})
