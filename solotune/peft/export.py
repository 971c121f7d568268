"""Adapters <-> the Hugging Face PEFT directory layout (``adapter_config.json`` +
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained(hf_llama, out_dir)`` loads what
solotune trained, and solotune can load a PEFT LoRA adapter trained elsewhere.

Names: ``layers.0.attention.wq.lora_a`` <-> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
Row layout: solotune's wq/wk rows are in Meta's adjacent-pair RoPE order, HF's in rotate-half
order. Because (P B) A = P (B A), permuting the rows of lora_B alone moves the whole delta into HF
order; lora_A (which acts on the input side) is unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..checkpoint.common import CheckpointError, atomic_dir
from ..checkpoint.names import HF_MODULES, hf_rows_to_meta, meta_rows_to_hf, rename
from ..config import ModelConfig
from ..errors import ConfigError, MissingPathError
from .lora import LORA_TARGETS, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# our target name -> HF module leaf name (q_proj, ..., up_proj), from the shared name table
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
HF_TARGETS: dict[str, str] = {
    t: HF_MODULES[f"layers.{{N}}.{_PARENT[t]}.{t}"].rsplit(".", 1)[1] for t in LORA_TARGETS
}
_MODULE_OF_HF = {v: k for k, v in HF_MODULES.items()}


def _rows_heads(canonical_module: str, cfg: ModelConfig) -> int | None:
    """Heads whose Q/K rows need the RoPE permutation, or None for the other Linears."""
    if canonical_module.endswith("attention.wq"):
        return cfg.n_heads
    if canonical_module.endswith("attention.wk"):
        return cfg.n_kv_heads
    return None


def adapter_config(rank: int, alpha: float, dropout: float, targets: Sequence[str],
                   base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json fields PEFT needs for a plain LoRA (stable across peft >= 0.13)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": alpha if not float(alpha).is_integer() else int(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(HF_TARGETS[t] for t in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def export_peft(model: nn.Module, model_cfg: ModelConfig, out_dir: str | os.PathLike[str],
                rank: int | None = None, alpha: float | None = None, dropout: float | None = None,
                targets: Sequence[str] | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory (atomically: a temp dir beside
    ``out_dir`` replaces it at the end). rank/alpha/dropout/targets default to the model's own and,
    when given, must agree with it. Returns ``out_dir``."""
    from safetensors.torch import save_file

    mods = list(lora_modules(model))
    if not mods:
        raise ConfigError("model has no LoRA adapters to export")
    ranks = {m.rank for _, m in mods}
    alphas = {m.alpha for _, m in mods}
    drops = {m.dropout_p for _, m in mods}
    leaves = {name.rsplit(".", 1)[1] for name, _ in mods}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ConfigError(f"adapters have mixed ranks {sorted(ranks)} / alphas {sorted(alphas)}; PEFT export needs one of each")
    have = {"rank": ranks.pop(), "alpha": alphas.pop(), "dropout": max(drops), "targets": leaves}
    given = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": set(targets) if targets is not None else None}
    for key, val in given.items():
        if val is not None and (val != have[key] if key != "dropout" else abs(val - have[key]) > 1e-12):
            raise ConfigError(f"export_peft {key}={val!r} but the model's adapters have {have[key]!r}")
    if any(m.merged for _, m in mods):
        raise ConfigError("adapters are merged into the base weights; unmerge before exporting")

    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods:
        hf = rename(name, HF_MODULES)
        if hf is None:
            raise ValueError(f"{name}: not a canonical LLaMA module name")
        b = m.lora_b.detach()
        heads = _rows_heads(name, model_cfg)
        if heads is not None:
            b = meta_rows_to_hf(b, heads)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_a.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b.cpu().contiguous()
    config = adapter_config(have["rank"], have["alpha"], have["dropout"], sorted(have["targets"]),
                            base_model_name_or_path)

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def import_peft(path: str | os.PathLike[str], model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT LoRA adapter directory -> (lora state dict with canonical names and Meta Q/K
    row order, adapter config dict). Only plain LoRA on the seven LLaMA Linears is accepted; anything
    else (DoRA, rsLoRA, per-module ranks, biases, modules_to_save) is one CheckpointError (a
    ValueError) naming the file; a missing file is a MissingPathError (a FileNotFoundError)."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg_file, w_file = d / CONFIG_NAME, d / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise MissingPathError(f"{f}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(cfg_file, f"invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise CheckpointError(cfg_file, "is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(cfg_file, f"peft_type {config.get('peft_type')!r}, only LORA is supported")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(key, ok) != ok:
            raise CheckpointError(cfg_file, f"{key}={config[key]!r} is not supported (need {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise CheckpointError(cfg_file, f"{key} is not supported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise CheckpointError(cfg_file, f"field {key!r} is missing")
    try:
        r = int(config["r"])
    except (TypeError, ValueError):
        raise CheckpointError(cfg_file, f"r={config['r']!r} is not an integer") from None

    sd: dict[str, torch.Tensor] = {}
    try:
        tensors = load_file(str(w_file))
    except Exception as e:  # not a safetensors file, truncated
        raise CheckpointError(w_file, f"cannot be read as safetensors: {e}") from None
    for key, t in tensors.items():
        m = _KEY.match(key)
        module = _MODULE_OF_HF.get(re.sub(r"\.layers\.\d+\.", ".layers.{N}.", m.group("module"))) if m else None
        if module is None:
            raise CheckpointError(w_file, f"tensor {key} is not a LoRA A/B of a LLaMA Linear")
        layer = int(re.search(r"\.layers\.(\d+)\.", m.group("module")).group(1))
        if layer >= model_cfg.n_layers:
            raise CheckpointError(w_file, f"tensor {key} is for layer {layer}, the model has {model_cfg.n_layers}")
        name = module.replace("{N}", str(layer))
        if m.group("ab") == "B":
            heads = _rows_heads(name, model_cfg)
            if heads is not None:
                t = hf_rows_to_meta(t, heads)
        out_name = f"{name}.lora_{m.group('ab').lower()}"
        if out_name in sd:
            raise CheckpointError(w_file, f"tensor {key} appears twice (several adapters in one file?)")
        rank_dim = 0 if m.group("ab") == "A" else 1
        if t.ndim != 2 or t.shape[rank_dim] != r:
            raise CheckpointError(w_file, f"tensor {key} has shape {tuple(t.shape)}, expected rank {r} on dim {rank_dim}")
        sd[out_name] = t.contiguous()
    for name in sd:
        pair = name[:-1] + ("b" if name.endswith("a") else "a")
        if pair not in sd:
            raise CheckpointError(w_file, f"{name} has no matching {pair.rsplit('.', 1)[1]}")
    return sd, config


def targets_of(lora_sd: dict[str, torch.Tensor]) -> list[str]:
    """Our target names (wq, ...) present in a canonical LoRA state dict."""
    return sorted({k.split(".")[-2] for k in lora_sd})
