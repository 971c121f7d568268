"""QLoRA / int8-LoRA and activation offload as options of the one loop (CPU, tiny model):
a quantized run equals LoRA over the dequantized weights, resumes bit for bit, never touches the
base; offload gives the same curve as no offload."""

from __future__ import annotations

import pytest
import torch

from solotune.quant import dense_state_dict, quantized_modules, swap_in_quantized
from solotune.train import TrainConfig, finetune

from train_fixtures import CtrlCAfter, WordTokenizer, tiny_config, tiny_model, write_records


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "records.json")


def _dequantized_twin(kind: str) -> torch.nn.Module:
    """The tiny model whose block linears hold exactly what the quantized base computes with."""
    q = swap_in_quantized(tiny_model(), kind, compute_dtype=torch.float32)
    twin = tiny_model()
    twin.load_state_dict(dict(dense_state_dict(q, torch.float32)))
    return twin


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_run_equals_lora_over_the_dequantized_weights(tmp_path, data, kind):
    cfg = tiny_config(tmp_path, data, max_steps=4, lora_targets=("wq", "wv", "w2"))
    quant = finetune(cfg.replace(quantize=kind, output_dir=str(tmp_path / "q")), model=tiny_model(),
                     tokenizer=WordTokenizer())
    plain = finetune(cfg.replace(output_dir=str(tmp_path / "p")), model=_dequantized_twin(kind),
                     tokenizer=WordTokenizer())
    torch.testing.assert_close(torch.tensor(quant.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    assert quant.losses[-1] < quant.losses[0]
    # the quantized weights live in buffers, yet count as the model's (frozen) parameters
    assert (quant.trainable_params, quant.total_params) == (plain.trainable_params, plain.total_params)


def test_qlora_leaves_the_base_alone_and_resumes_exactly(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=5, quantize="nf4", lora_dropout=0.1)
    model = tiny_model()
    straight = finetune(cfg.replace(output_dir=str(tmp_path / "straight")), model=model, tokenizer=WordTokenizer())
    q = quantized_modules(model)
    assert len(q) == 2 * 7 and not any(p.requires_grad for m in q.values() for p in m.parameters())
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(2))
    resumed = finetune(cfg.replace(resume=str(tmp_path / "run")), model=tiny_model(), tokenizer=WordTokenizer())
    assert resumed.losses == straight.losses


def test_quantize_needs_lora():
    with pytest.raises(ValueError, match="TrainConfig.quantize"):
        TrainConfig(quantize="nf4", full=True)
    with pytest.raises(ValueError, match="TrainConfig.quantize"):
        TrainConfig(quantize="nf5")


@pytest.mark.parametrize("gc", ["all", "every:2"])
def test_activation_offload_gives_the_same_curve(tmp_path, data, gc):
    cfg = tiny_config(tmp_path, data, max_steps=3, grad_checkpoint=gc, lora_dropout=0.1)
    a = finetune(cfg.replace(output_dir=str(tmp_path / "a")), model=tiny_model(), tokenizer=WordTokenizer())
    b = finetune(cfg.replace(output_dir=str(tmp_path / "b"), offload="activations"), model=tiny_model(),
                 tokenizer=WordTokenizer())
    assert a.losses == b.losses and a.val_curve == b.val_curve


def test_qlora_adapter_evaluates_and_merges_against_its_dequantized_base(tmp_path):
    """eval/generate/merge of a QLoRA run rebuild the same NF4 base; merge writes 16-bit
    dequantized-base + delta weights that reproduce the QLoRA model's logits."""
    import solotune
    from solotune import cli

    from cli_fixtures import common_flags, write_tiny_base

    base = write_tiny_base(tmp_path / "base")
    data = write_records(tmp_path / "records.json")
    run = tmp_path / "qlora"
    assert cli.main(["finetune", *common_flags(base, data, run), "--max-steps", "3", "--quantize", "nf4"]) == 0
    assert cli.main(["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")]) == 0

    from argparse import Namespace

    from solotune.train.commands import model_and_adapter

    args = Namespace(model=None, adapter=str(run), tokenizer=None, device="cpu")
    qmodel, _, _ = model_and_adapter(args, torch.float32)
    assert quantized_modules(qmodel), "the adapter's base must be rebuilt quantized"
    toks = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = qmodel(toks)
        merged = solotune.load(str(tmp_path / "merged"))[0](toks)
        plain = solotune.load(str(base))[0](toks)
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-3  # NF4 + the adapter moved the logits: the match means something
    # generate --quantize may not swap the base a QLoRA adapter was trained over (one clear line, exit 2)
    prompt = ["--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(["generate", "--adapter", str(run), "--quantize", "int8", *prompt]) == 2
    assert cli.main(["generate", "--adapter", str(run), "--quantize", "nf4", *prompt]) == 0
