"""Model configuration: one dataclass, named presets, and constructors from the three checkpoint formats."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError


def _fields_of(source: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A format constructor whose missing field (KeyError) or unusable value (``int(None)``,
    ``int("x")``) is a ConfigError naming ``source`` and the field, not a bare KeyError/TypeError."""
    import functools

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConfigError:
                raise
            except KeyError as e:
                raise ConfigError(f"{source} has no {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{source}: a field is not a number: {e}") from None
        return checked
    return wrap


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-architecture decoder.

    ``n_kv_heads < n_heads`` is grouped-query attention; ``tie_embeddings`` shares the input
    embedding with the output head (SmolLM2); ``rope_theta`` is the RoPE base.
    """

    name: str = "custom"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU inner size (w1/w3 out, w2 in)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Exact parameter count of :class:`solotune.model.Transformer` for this config."""
        kv = self.n_kv_heads * self.head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv * 2
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + emb + head + self.dim

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None

    # ------------------------------------------------------ format constructors
    @classmethod
    @_fields_of("params.json")
    def from_meta_params(cls, params: Mapping[str, Any], name: str = "meta", vocab_size: int | None = None) -> "ModelConfig":
        """From Meta's ``params.json`` (``dim, n_layers, n_heads, n_kv_heads, multiple_of,
        ffn_dim_multiplier, norm_eps, vocab_size, rope_theta``). ``vocab_size`` of -1 in the file
        means "take it from the tokenizer/weights": pass it explicitly."""
        dim = int(params["dim"])
        hidden = params.get("hidden_dim")
        if hidden is None:
            hidden = meta_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
        vs = int(params.get("vocab_size", -1))
        if vs <= 0:
            if vocab_size is None:
                raise ConfigError("params.json has vocab_size -1; pass vocab_size from the tokenizer or weights")
            vs = vocab_size
        return cls(
            name=name,
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
            vocab_size=vs,
            hidden_dim=int(hidden),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=int(params.get("max_seq_len", 4096)),
            tie_embeddings=bool(params.get("tie_embeddings", False)),
        )

    def to_meta_params(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size, "hidden_dim": self.hidden_dim,
            "norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "max_seq_len": self.max_seq_len,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    @_fields_of("config.json")
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "hf") -> "ModelConfig":
        """From a transformers ``config.json`` of a ``LlamaForCausalLM``."""
        archs = cfg.get("architectures") or []
        mtype = cfg.get("model_type", "llama")
        if mtype not in ("llama", "mistral") and not any("Llama" in a for a in archs):
            raise ConfigError(f"config.json model_type {mtype!r} is not a LLaMA-architecture model")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it in rope_parameters
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            name=name,
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        }

    @classmethod
    @_fields_of("GGUF metadata")
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str = "gguf", tied: bool | None = None) -> "ModelConfig":
        """From GGUF key/values (``llama.*``). ``tied`` is decided by the loader from whether
        an ``output.weight`` tensor exists."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ConfigError(f"GGUF general.architecture is {arch!r}; only 'llama' is supported")
        p = f"{arch}."
        n_heads = int(meta[p + "attention.head_count"])
        vocab = meta.get(p + "vocab_size")
        if vocab is None:
            vocab = len(meta["tokenizer.ggml.tokens"])
        return cls(
            name=name,
            dim=int(meta[p + "embedding_length"]),
            n_layers=int(meta[p + "block_count"]),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(p + "attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            hidden_dim=int(meta[p + "feed_forward_length"]),
            norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
            max_seq_len=int(meta.get(p + "context_length", 4096)),
            tie_embeddings=bool(tied) if tied is not None else False,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        return cls(**json.loads(Path(path).read_text()))


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                        hidden_dim=176, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256),
    "smollm2-135m": ModelConfig(name="smollm2-135m", dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                vocab_size=49152, hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True),
    "llama2-7b": ModelConfig(name="llama2-7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             vocab_size=32000, hidden_dim=11008, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": ModelConfig(name="llama2-13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                              vocab_size=32000, hidden_dim=13824, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": ModelConfig(name="llama2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              vocab_size=32000, hidden_dim=28672, norm_eps=1e-5, max_seq_len=4096),
}
