"""Weight-name tables between solotune's canonical (Meta) names and the HF / GGUF names, and the
Q/K row permutation between Meta's adjacent-pair RoPE layout and HF's rotate-half layout.

The tables are data: ``{N}`` stands for the layer index.
"""

from __future__ import annotations

import re

import torch

# canonical (Meta) name -> HF transformers LlamaForCausalLM name
HF_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{N}.attention.wq.weight": "model.layers.{N}.self_attn.q_proj.weight",
    "layers.{N}.attention.wk.weight": "model.layers.{N}.self_attn.k_proj.weight",
    "layers.{N}.attention.wv.weight": "model.layers.{N}.self_attn.v_proj.weight",
    "layers.{N}.attention.wo.weight": "model.layers.{N}.self_attn.o_proj.weight",
    "layers.{N}.feed_forward.w1.weight": "model.layers.{N}.mlp.gate_proj.weight",
    "layers.{N}.feed_forward.w2.weight": "model.layers.{N}.mlp.down_proj.weight",
    "layers.{N}.feed_forward.w3.weight": "model.layers.{N}.mlp.up_proj.weight",
    "layers.{N}.attention_norm.weight": "model.layers.{N}.input_layernorm.weight",
    "layers.{N}.ffn_norm.weight": "model.layers.{N}.post_attention_layernorm.weight",
}

# canonical (Meta) name -> GGUF (llama.cpp) tensor name
GGUF_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{N}.attention.wq.weight": "blk.{N}.attn_q.weight",
    "layers.{N}.attention.wk.weight": "blk.{N}.attn_k.weight",
    "layers.{N}.attention.wv.weight": "blk.{N}.attn_v.weight",
    "layers.{N}.attention.wo.weight": "blk.{N}.attn_output.weight",
    "layers.{N}.feed_forward.w1.weight": "blk.{N}.ffn_gate.weight",
    "layers.{N}.feed_forward.w2.weight": "blk.{N}.ffn_down.weight",
    "layers.{N}.feed_forward.w3.weight": "blk.{N}.ffn_up.weight",
    "layers.{N}.attention_norm.weight": "blk.{N}.attn_norm.weight",
    "layers.{N}.ffn_norm.weight": "blk.{N}.ffn_norm.weight",
}

# canonical module name (the Linear, without ".weight") -> HF module name; used for LoRA/PEFT export
HF_MODULES: dict[str, str] = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in HF_NAMES.items()}


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for src, dst in table.items():
        pat = re.compile("^" + re.escape(src).replace(r"\{N\}", r"(?P<N>\d+)") + "$")
        out.append((pat, dst))
    return out


_CACHE: dict[int, list[tuple[re.Pattern[str], str]]] = {}


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map one name through ``table`` (canonical -> other); None when it matches no entry."""
    pats = _CACHE.setdefault(id(table), _compile(table))
    for pat, dst in pats:
        m = pat.match(name)
        if m:
            return dst.replace("{N}", m.group("N")) if "N" in m.groupdict() else dst
    return None


def inverse(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


HF_TO_CANONICAL = inverse(HF_NAMES)
GGUF_TO_CANONICAL = inverse(GGUF_NAMES)


def hf_rows_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K rows [n_heads*D, ...] from HF's rotate-half order (per head: all real parts, then all
    imaginary parts) to Meta's adjacent pairs (re0, im0, re1, im1, ...). Works on LoRA B too."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_rows_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`hf_rows_to_meta`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
