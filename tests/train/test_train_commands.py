"""``solotune finetune / eval / merge / export-peft`` end to end on a tiny HF checkpoint with the
LLaMA-2 tokenizer: flags -> TrainConfig, eval reproduces the run's val loss, merged weights load in
transformers, the exported adapter loads in peft, and both reproduce our logits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from solotune import cli
from solotune.train import TrainConfig
from solotune.train.commands import add_finetune_args, finetune_config
from solotune.train.config import FULL_FINETUNE, PROFILES
from solotune.train.weights import attach_adapter, load_adapter

from cli_fixtures import CFG, base, common_flags, data  # noqa: F401  (module fixtures)


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_finetune_args(p)
    return p.parse_args(list(argv))


def _common(base: Path, data: Path, out: Path) -> list[str]:
    return common_flags(base, data, out)


# --------------------------------------------------------------------------------- flags -> config
def test_no_flags_is_the_quickstart_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no earlier runs/quickstart that would move the default output dir
    assert finetune_config(_parse()) == TrainConfig.profile("quickstart")
    assert finetune_config(_parse("--profile", "course")) == TrainConfig()


def test_flags_override_the_profile():
    cfg = finetune_config(_parse("--lr", "2e-4", "--lora-targets", "wq,wo", "--full", "--max-steps", "7",
                                 "--grad-checkpoint", "every:3", "--precision", "bf16", "--val-range", "450:500",
                                 "--max-grad-norm", "0", "--no-generate"))
    want = TrainConfig.profile("quickstart", lr=2e-4, lora_targets=("wq", "wo"), full=True, max_steps=7,
                               grad_checkpoint="every:3", precision="bf16", val_range=(450, 500),
                               max_grad_norm=None, generate_samples=False)
    assert cfg == want


def test_each_method_gets_its_profiles_learning_rate(tmp_path, monkeypatch, capsys):
    """Full fine-tuning does not inherit LoRA's demo rate; a --lr you pass always wins."""
    monkeypatch.chdir(tmp_path)
    lora_lr, full_lr = PROFILES["quickstart"]["lr"], FULL_FINETUNE["quickstart"]["lr"]
    assert full_lr < lora_lr / 10
    assert finetune_config(_parse()).lr == lora_lr
    assert finetune_config(_parse("--full")).lr == finetune_config(_parse("--lora-rank", "0")).lr == full_lr
    assert finetune_config(_parse("--full", "--lr", "1e-3")).lr == 1e-3
    assert finetune_config(_parse("--profile", "course", "--full")).lr == TrainConfig().lr  # the course's, both methods
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    assert f"{lora_lr:g} (full {full_lr:g})" in capsys.readouterr().out


def test_bad_flag_values_are_errors():
    with pytest.raises(SystemExit):
        _parse("--precision", "fp8")
    with pytest.raises(SystemExit):
        _parse("--train-range", "0-200")
    with pytest.raises(ValueError, match="TrainConfig.lora_targets"):
        finetune_config(_parse("--lora-targets", "wq,qkv"))


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def lora_run(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert cli.main(["finetune", *_common(base, data, out), "--max-steps", "6", "--save-every", "3"]) == 0
    return out


def test_resume_flag_alone_continues_with_the_saved_config(lora_run, tmp_path):
    cfg = finetune_config(_parse("--resume", str(lora_run / "checkpoints" / "step-000003")))
    saved = json.loads((lora_run / "checkpoints" / "step-000003" / "config.json").read_text())
    assert cfg == TrainConfig.from_dict({**saved, "resume": str(lora_run / "checkpoints" / "step-000003")})


def _our_lora_model(base: Path, run: Path):
    import solotune

    model, _ = solotune.load(str(base))
    return attach_adapter(model, load_adapter(run), dropout=0.0).eval()


def test_eval_reproduces_the_runs_val_loss(lora_run, capsys):
    summary = json.loads((lora_run / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(lora_run), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["records"] == 16 and got["val_range"] == [32, 48]
    assert got["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    # and without the adapter: the base model's loss, i.e. the run's "before"
    assert cli.main(["eval", "--model", summary["model"], "--data", summary["config"]["data"], "--val-range", "32:48",
                     "--max-seq-len", "128", "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["val_loss"] == pytest.approx(summary["val_loss_before"], rel=1e-5)


def test_merge_loads_in_transformers_with_our_logits(base, lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import solotune

    assert cli.main(["merge", "--adapter", str(lora_run), "--output", str(tmp_path / "merged")]) == 0
    toks = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _our_lora_model(base, lora_run)(toks)
        plain = solotune.load(str(base))[0](toks)
        assert (ours - plain).abs().max() > 1e-3  # the adapter is not a no-op, so the match below means something
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(hf(input_ids=toks).logits, ours, atol=1e-4, rtol=1e-4)
        merged, tok = solotune.load(str(tmp_path / "merged"))  # tokenizer travelled with it
        torch.testing.assert_close(merged(toks), ours, atol=1e-4, rtol=1e-4)
    assert tok.encode("Hello world") == [15043, 3186]


def test_export_peft_loads_in_peft_with_our_logits(base, lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    assert cli.main(["export-peft", "--adapter", str(lora_run), "--output", str(tmp_path / "peft")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(base)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    toks = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=toks).logits, _our_lora_model(base, lora_run)(toks),
                                   atol=1e-4, rtol=1e-4)
    # ... and our eval reads the PEFT folder back to the same loss
    assert load_adapter(tmp_path / "peft", CFG).rank == 4


def test_full_finetune_output_is_a_loadable_model(base, data, tmp_path, capsys):
    import solotune

    out = tmp_path / "full"
    assert cli.main(["finetune", *_common(base, data, out), "--max-steps", "2", "--full", "--lr", "1e-3"]) == 0
    model, tok = solotune.load(str(out / "final"))
    assert tok.encode("Hello world") == [15043, 3186]
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out / "final"), "--data", str(data), "--val-range", "32:48",
                     "--max-seq-len", "128", "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys, base, data):
    assert cli.main(["finetune", *_common(base, data, tmp_path / "x"), "--lora-targets", "wq,qkv"]) == 2
    assert "lora_targets" in capsys.readouterr().err
    assert cli.main(["eval", "--adapter", str(tmp_path / "missing")]) == 2


# ------------------------------------------------------------------------------ generate --adapter
def test_eval_and_generate_take_the_same_model_arguments():
    parser = cli.build_parser()
    shared = ["--model", "m", "--adapter", "a", "--tokenizer", "t", "--device", "cpu", "--precision", "bf16"]
    ev, gen = parser.parse_args(["eval", *shared]), parser.parse_args(["generate", *shared, "--prompt", "x"])
    for name in ("model", "adapter", "tokenizer", "device", "precision"):
        assert getattr(ev, name) == getattr(gen, name) == shared[shared.index("--" + name) + 1]
    assert parser.parse_args(["generate", "--dtype", "bf16", "--prompt", "x"]).precision == "bf16"  # older spelling


def test_generate_with_an_adapter_equals_the_merged_model(base, lora_run, tmp_path, capsys):
    """Every adapter form eval accepts, attached unmerged, greedy-decodes the merged model's tokens."""
    assert cli.main(["merge", "--adapter", str(lora_run), "--output", str(tmp_path / "merged")]) == 0
    assert cli.main(["export-peft", "--adapter", str(lora_run), "--output", str(tmp_path / "peft")]) == 0
    prompt = ["--prompt", "The capital of France is", "--prompt", "One two", "--max-new-tokens", "12", "--device", "cpu"]

    def generate(*how: str) -> str:
        capsys.readouterr()
        assert cli.main(["generate", *how, *prompt]) == 0
        return capsys.readouterr().out

    merged = generate("--model", str(tmp_path / "merged"))
    assert merged != generate("--model", str(base))  # the adapter changes the answer: the test can fail
    for adapter in (lora_run, lora_run / "final", lora_run / "checkpoints" / "step-000006"):
        assert generate("--adapter", str(adapter)) == merged, adapter
    assert generate("--adapter", str(tmp_path / "peft"), "--model", str(base)) == merged


def test_generate_quantize_int8_runs_over_the_int8_base(base, lora_run, capsys):
    """`generate --quantize int8`: the base's block linears stored int8 for generation (the text may
    differ from the 16-bit base's: the weights do); an adapter trained over a 16-bit base may be
    attached to it."""
    prompt = ["--prompt", "The capital of France is", "--max-new-tokens", "8", "--device", "cpu"]
    assert cli.main(["generate", "--model", str(base), "--quantize", "int8", *prompt]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["generate", "--adapter", str(lora_run), "--quantize", "int8", *prompt]) == 0
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(base), "--quantize", "nope", *prompt])
