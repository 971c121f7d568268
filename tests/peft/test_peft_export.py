"""PEFT-format export: HF LlamaForCausalLM + peft.PeftModel.from_pretrained reproduces our LoRA model."""

from __future__ import annotations

import json

import pytest
import torch

from solotune.checkpoint.hf import canonical_to_hf
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.peft import LORA_TARGETS, apply_lora, lora_parameters, lora_state_dict
from solotune.peft.export import CONFIG_NAME, WEIGHTS_NAME, export_peft, import_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GQA = ModelConfig(name="gqa", dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, hidden_dim=80,
                  rope_theta=500000.0, norm_eps=1e-6)


def lora_model(cfg: ModelConfig, targets=LORA_TARGETS, seed: int = 0, rank: int = 4, alpha: float = 8):
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # random norms too, so a wrong norm mapping would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    apply_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=0.0, generator=g)
    with torch.no_grad():
        for p in lora_parameters(model):  # B != 0 so the adapters change the output
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), base_sd


def hf_peft_model(cfg: ModelConfig, base_sd: dict[str, torch.Tensor], adapter_dir):
    kw = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    missing, unexpected = hf.load_state_dict(canonical_to_hf(base_sd, cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (cfg.tie_embeddings or not missing)
    return peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


@pytest.mark.parametrize("cfg,targets", [
    (GQA, LORA_TARGETS),
    (GQA.replace(name="mha-tied", n_heads=4, n_kv_heads=4, tie_embeddings=True), ("wq", "wv")),
])
def test_peft_from_pretrained_reproduces_logits(tmp_path, cfg, targets) -> None:
    model, base_sd = lora_model(cfg, targets)
    out = export_peft(model, cfg, tmp_path / "adapter", rank=4, alpha=8, dropout=0.0, targets=targets,
                      base_model_name_or_path="tiny-test")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    conf = json.loads((out / CONFIG_NAME).read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["lora_alpha"] == 8 and conf["bias"] == "none" and conf["base_model_name_or_path"] == "tiny-test"
    hf_names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
                "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    assert conf["target_modules"] == sorted(hf_names[t] for t in targets)

    pm = hf_peft_model(cfg, base_sd, out)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)
        theirs = pm(input_ids=tokens).logits
        with pm.disable_adapter():
            base_only = pm(input_ids=tokens).logits
    assert (ours - base_only).abs().max() > 1e-2  # the adapters matter, so the match below means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_peft_tensor_names_and_qk_rows(tmp_path) -> None:
    model, _ = lora_model(GQA)
    out = export_peft(model, GQA, tmp_path / "a")
    from safetensors.torch import load_file

    sd = load_file(str(out / WEIGHTS_NAME))
    assert len(sd) == 2 * len(LORA_TARGETS) * GQA.n_layers
    ours = lora_state_dict(model)
    a = sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = sd["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    torch.testing.assert_close(a, ours["layers.1.attention.wq.lora_a"], atol=0, rtol=0)  # A unpermuted
    assert not torch.equal(b, ours["layers.1.attention.wk.lora_b"])  # B rows permuted for HF
    torch.testing.assert_close(sd["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"],
                               ours["layers.0.feed_forward.w2.lora_b"], atol=0, rtol=0)


def test_import_round_trip(tmp_path) -> None:
    model, _ = lora_model(GQA)
    out = export_peft(model, GQA, tmp_path / "a")
    sd, conf = import_peft(out, GQA)
    ours = lora_state_dict(model)
    assert sd.keys() == ours.keys()
    for k in ours:
        torch.testing.assert_close(sd[k], ours[k], atol=0, rtol=0)
    assert conf["r"] == 4


def test_export_is_atomic_and_validates(tmp_path) -> None:
    model, _ = lora_model(GQA, ("wq",))
    target = tmp_path / "a"
    export_peft(model, GQA, target)
    before = (target / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="rank"):
        export_peft(model, GQA, target, rank=8)
    with pytest.raises(ValueError, match="targets"):
        export_peft(model, GQA, target, targets=("wq", "wv"))
    assert (target / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp dirs left behind
    with pytest.raises(ValueError, match="no LoRA"):
        export_peft(build_model(GQA, seed=0), GQA, tmp_path / "b")


def test_import_rejects_unsupported(tmp_path) -> None:
    model, _ = lora_model(GQA, ("wq",))
    out = export_peft(model, GQA, tmp_path / "a")
    conf = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(out, GQA)
    with pytest.raises(ValueError, match="layer 1"):
        import_peft(export_peft(model, GQA, tmp_path / "b"), GQA.replace(n_layers=1))
