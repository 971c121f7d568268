"""What a run writes and reads back besides its trainer state: the trainable weights of a
checkpoint, the ``final/`` folder (a LoRA adapter, or a full model as an HF directory with its
tokenizer), and adapters read from any of the places they live (for eval / merge / export-peft).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint.common import CheckpointError
from ..errors import ConfigError, MissingPathError
from ..peft import apply_lora, load_lora_state_dict, lora_state_dict
from .config import TrainConfig

FINAL = "final"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"  # not adapter_config.json: that name means "PEFT layout" to peft (see export-peft)


def trainable_state(model: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the adapters, or every weight (the tied head once)."""
    if lora:
        return lora_state_dict(model)
    sd = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("output.weight", None)
    return sd


@torch.no_grad()
def load_trainable_state(model: nn.Module, sd: dict[str, torch.Tensor], lora: bool, source: Path) -> None:
    try:
        if lora:
            load_lora_state_dict(model, sd)
            return
        own = trainable_state(model, lora=False)
        missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
        if missing or unexpected:
            raise KeyError(f"missing {missing[:6]}, unexpected {unexpected[:6]}")
        for k, t in own.items():
            if t.shape != sd[k].shape:
                raise ValueError(f"tensor {k}: shape {tuple(sd[k].shape)}, model has {tuple(t.shape)}")
            t.copy_(sd[k])
    except (KeyError, ValueError) as e:
        raise CheckpointError(source, f"weights do not fit this model: {e}") from None


def adapter_config(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    return {"format": "solotune-lora", "base_model": cfg.model, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout, "targets": list(cfg.lora_targets),
            "model_config": model.config.to_meta_params() if hasattr(model, "config") else None,
            "train_config": cfg.to_dict()}


def save_final(path: Path, model: nn.Module, cfg: TrainConfig, tokenizer: Any,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """``final/``: the adapter (``adapter.safetensors`` + ``adapter.json``) or, for full
    fine-tuning, the whole model as an HF directory with its tokenizer (loadable by
    ``solotune.load`` and by transformers). ``state``: the trainable weights to write instead of
    reading them from ``model`` (a sharded run gathers them first)."""
    from safetensors.torch import save_file

    from ..checkpoint.common import atomic_dir

    if state is None:
        state = trainable_state(model, cfg.use_lora)
    if cfg.use_lora:
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, model), indent=2) + "\n")
        return path
    return save_hf_with_tokenizer(model.config, state, path, tokenizer)


def save_hf_with_tokenizer(model_cfg: Any, sd: dict[str, torch.Tensor], path: Path, tokenizer: Any) -> Path:
    """An HF directory (``save_hf``) plus the tokenizer, so the folder stands on its own."""
    from ..checkpoint.hf import save_hf

    save_hf(model_cfg, sd, path)
    write_tokenizer(tokenizer, path)
    return path


def write_tokenizer(tokenizer: Any, out: Path) -> bool:
    """Put ``tokenizer`` into the HF directory ``out``: a copy of its tokenizer.json / tokenizer.model
    (and tokenizer_config.json) when it came from one, else -- a GGUF model's vocab -- a
    tokenizer.json serialised from its ``tokenizers`` backend plus a tokenizer_config.json with the
    special tokens, add_bos and chat template. Returns False when neither is possible."""
    src = Path(getattr(tokenizer, "source", "") or "")
    if src.suffix in (".json", ".model") and src.is_file():
        shutil.copyfile(src, out / src.name)
        if (src.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(src.parent / "tokenizer_config.json", out / "tokenizer_config.json")
        return True
    hf_tok = getattr(getattr(tokenizer, "backend", None), "tok", None)
    if hf_tok is None or not hasattr(hf_tok, "save"):
        return False
    hf_tok.save(str(out / "tokenizer.json"))
    conf: dict[str, Any] = {"add_bos_token": bool(tokenizer.add_bos), "tokenizer_class": "PreTrainedTokenizerFast",
                            "eos_token": tokenizer.id_to_token(tokenizer.eos_id)}
    if tokenizer.bos_id is not None:
        conf["bos_token"] = tokenizer.id_to_token(tokenizer.bos_id)
    if getattr(tokenizer, "pad_id", None) is not None:
        conf["pad_token"] = tokenizer.id_to_token(tokenizer.pad_id)
    if getattr(tokenizer, "chat_template", None):
        conf["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return True


@dataclass
class Adapter:
    """A LoRA adapter read from disk (canonical names, Meta Q/K row order)."""

    weights: dict[str, torch.Tensor]
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    base_model: str | None
    source: Path
    train_config: dict[str, Any] | None = None


def load_adapter(path: str | Path, model_cfg: Any = None) -> Adapter:
    """Read an adapter from: a ``final/`` folder (adapter.json), a training checkpoint folder, an
    output directory (its final/, else its latest checkpoint), or an HF PEFT folder
    (adapter_config.json; needs ``model_cfg`` for the Q/K row order)."""
    from safetensors.torch import load_file

    from ..peft.export import import_peft, targets_of
    from .state import CONFIG, SHARDED, TRAINER_STATE, WEIGHTS, resolve_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise MissingPathError(f"--adapter {p}: no such directory")
    if (p / FINAL / ADAPTER_CONFIG).is_file():
        p = p / FINAL
    if (p / ADAPTER_CONFIG).is_file():
        try:
            meta = json.loads((p / ADAPTER_CONFIG).read_text())
            return Adapter(load_file(str(p / ADAPTER_WEIGHTS)), int(meta["rank"]), float(meta["alpha"]),
                           float(meta["dropout"]), tuple(meta["targets"]), meta.get("base_model"), p,
                           meta.get("train_config"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(p, f"not a readable solotune adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}): {e!r}") from None
    if (p / "adapter_config.json").is_file():  # HF PEFT layout
        if model_cfg is None:
            raise ValueError(f"{p}: a PEFT adapter needs the base model's config to read")
        sd, conf = import_peft(p, model_cfg)
        return Adapter(sd, int(conf["r"]), float(conf["lora_alpha"]), float(conf.get("lora_dropout", 0.0)),
                       tuple(targets_of(sd)), conf.get("base_model_name_or_path"), p)
    try:
        d = resolve_checkpoint(p)
    except MissingPathError:  # its wording is --resume's
        raise MissingPathError(f"--adapter {p}: not an adapter folder (no {ADAPTER_CONFIG}, adapter_config.json "
                               f"or {TRAINER_STATE} in it, and no checkpoints/ of a run)") from None
    try:
        saved = json.loads((d / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(d / CONFIG, f"cannot read the run's config: {e}") from None
    cfg = TrainConfig.from_dict(saved)
    if not cfg.use_lora:
        raise ConfigError(f"{d}: this checkpoint is of a full fine-tuning run, not a LoRA adapter")
    if (d / WEIGHTS).is_file():
        try:
            weights = load_file(str(d / WEIGHTS))
        except Exception as e:  # not a safetensors file, truncated
            raise CheckpointError(d / WEIGHTS, f"cannot be read as safetensors: {e}") from None
    else:  # written by N ranks: reassemble the adapter from the DCP shards
        from ..parallel.state_dict import read_sharded_weights

        weights = read_sharded_weights(d / SHARDED)
    return Adapter(weights, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.model, d,
                   cfg.to_dict())


def attach_adapter(model: nn.Module, adapter: Adapter, dropout: float | None = None) -> nn.Module:
    """Wrap ``model``'s target Linears and load ``adapter`` into them (in place; returns ``model``)."""
    lora_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    apply_lora(model, adapter.targets, adapter.rank, adapter.alpha,
               adapter.dropout if dropout is None else dropout, lora_dtype=lora_dtype)
    try:
        load_lora_state_dict(model, adapter.weights)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{adapter.source}: adapter does not fit the model: {e}") from None
    return model
