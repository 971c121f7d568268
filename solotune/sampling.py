"""Choosing the next token on the device: greedy, temperature, top-k, top-p, with no host sync.

A draw is an *exponential race*: with E_i ~ Exp(1) drawn independently, ``argmax_i p_i / E_i``
is token i with probability p_i (E_i / p_i are exponential with rate p_i, and the smallest of
them wins in proportion to its rate). Unlike ``torch.multinomial`` it is one elementwise op and an
argmax, traceable by ``torch.compile``, and the noise can be drawn outside a compiled graph with
the caller's ``torch.Generator`` — so a seeded run gives the same tokens compiled or eager.

Shapes: B rows, V vocab.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

_TINY = 1e-20  # exponential_ may return exactly 0: keep masked tokens (p = 0) at 0 / tiny = 0


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError on settings outside their ranges."""
    if temperature is None or temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Probabilities [B, V] fp32 after temperature, then the ``top_k`` best, then the smallest set
    whose probability reaches ``top_p`` (the best token always stays). temperature > 0."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
         noise: torch.Tensor | None) -> torch.Tensor:
    """Next token per row [B] long from ``logits`` [B, V]; ``noise`` [B, V] Exp(1) (unused when greedy).

    Pure tensor code (no host sync, no data-dependent Python): the body of a compiled decode step.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if noise is None:
        raise ValueError("sampling needs Exp(1) noise [B, V] (see draw_noise)")
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return (probs / noise.clamp_min(_TINY)).argmax(dim=-1)


def draw_noise(rows: int, vocab: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] fp32 for one draw per row (one kernel, no host sync)."""
    return torch.empty(rows, vocab, device=device, dtype=torch.float32).exponential_(1.0, generator=generator)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V] -> [B] long.

    temperature 0 is greedy (argmax; top-k/top-p are then moot). Otherwise the logits are divided
    by the temperature, cut to the ``top_k`` best, then to the smallest set whose probability
    reaches ``top_p``, and one token is drawn with ``generator`` (an exponential race).
    """
    check_sampling(temperature, top_k, top_p)
    noise = None if temperature == 0 else draw_noise(logits.shape[0], logits.shape[-1], logits.device, generator)
    return pick(logits.float(), temperature, top_k, top_p, noise)
