"""LLaMA-architecture decoder in plain PyTorch.

Layer names follow Meta's reference (``tok_embeddings``, ``layers.N.attention.{wq,wk,wv,wo}``,
``layers.N.feed_forward.{w1,w2,w3}``, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``) and so
does the Q/K row layout: RoPE rotates *adjacent* pairs (dims 2i, 2i+1) of each head, as in Meta's
``consolidated.*.pth`` and llama.cpp's GGUF. The HF loader permutes HF's rotate-half rows into this
layout.

Shapes: B batch, T new tokens, S key positions (T without cache or at prefill, the cache's max_len after),
H query heads, Hkv key/value heads, D head dim, C model dim, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Varlen, block_causal_mask, pad_segments, varlen_available
from .config import ModelConfig
from .data.batch import Batch
from .kv_cache import CachePos, KVCache, generation_mask

# head(hidden [B, T, C] after the final norm, output projection) -> whatever the caller wants
# (a loss that owns the output projection: see solotune/train/loss.py).
Head = Callable[[torch.Tensor, nn.Module], Any]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angles for ``positions`` [B, T] -> (cos, sin), each [B, T, 1, D/2], in ``dtype``.

    Computed in fp32 from the positions on every call: no buffers, so a model built on the meta
    device needs nothing re-initialised after ``load_state_dict(assign=True)``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` [B, T, H, D] by the angles (cos/sin [B, T, 1, D/2])."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.rope: Callable[..., torch.Tensor] = apply_rope  # solotune.kernels swaps in its fused RoPE

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | Varlen | None, cache_pos: CachePos | None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. ``mask``: [B, 1, T, S] bool (True = attend), None for plain
        causal, or a :class:`~solotune.attention.Varlen` for packed rows (no mask at all)."""
        B, T, _ = x.shape
        q = self.rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = self.rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if isinstance(mask, Varlen):  # packed rows: varlen flash over the flattened tokens
            rep = self.n_heads // self.n_kv_heads
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            return self.wo(mask.attend(q, k, v).reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache_pos is not None:  # generation: the static cache stores k/v and attends (solotune/kv_cache.py)
            if self.kv_cache is None:
                raise RuntimeError("cache_pos given but no KV cache: call model.setup_cache(batch, max_len) first")
            return self.wo(self.kv_cache.attend(q, k, v, cache_pos, mask).transpose(1, 2).reshape(B, T, -1))
        if self.n_kv_heads != self.n_heads:  # GQA: each KV head serves n_heads / n_kv_heads query heads
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            # Plain causal attention over exactly these T keys (no cache, or an empty cache).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.recompute = "off"  # off | full | selective: set by Transformer.set_grad_checkpointing

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | Varlen | None, cache_pos: CachePos | None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. Checkpointing happens here, inside the block's own forward,
        so a compiled block compiles the checkpoint with it (the selective policy then reaches
        the partitioner) and FSDP's per-block hooks wrap the recomputation too."""
        if self.recompute != "off" and self.training and torch.is_grad_enabled():
            if self.recompute == "selective":
                extra = {"context_fn": save_matmul_outputs}
            elif torch.compiler.is_compiling():  # full: make the partitioner recompute fp8 GEMMs too
                extra = {"context_fn": recompute_scaled_matmuls}
            else:
                extra = {}
            return checkpoint(self._forward, x, cos, sin, mask, cache_pos, use_reentrant=False, **extra)
        return self._forward(x, cos, sin, mask, cache_pos)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | Varlen | None, cache_pos: CachePos | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def document_mask(seq_lens: tuple[tuple[int, ...], ...], T: int, device: torch.device) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] bool for rows packed with several documents: a token
    attends to earlier tokens of its own document only. Padding after the last document forms one
    more block (it only sees itself and other padding, so no row of the mask is empty)."""
    doc = torch.empty(len(seq_lens), T, dtype=torch.long)
    for r, row in enumerate(seq_lens):
        ids = [torch.full((n,), d) for d, n in enumerate(row)]
        used = sum(row)
        ids.append(torch.full((T - used,), len(row)))
        doc[r] = torch.cat(ids)
    return block_causal_mask(doc.to(device))


def packed_attention(batch: Batch, device: torch.device) -> torch.Tensor | Varlen:
    """The attention form of rows holding several documents: varlen flash attention on CUDA (no
    [T, T] mask; SDPA with a dense mask would fall back from flash to slower kernels), else the
    exact dense block-diagonal mask."""
    T = batch.input_ids.shape[1]
    if varlen_available(device):
        cu = pad_segments(batch.cu_seqlens()).to(device, non_blocking=True)
        # the number of documents changes from micro-batch to micro-batch: a compiled block traces
        # that length as a symbol at once, instead of compiling for the first length and again
        # (padded to a few bucketed lengths: CUDA graphs are recorded per concrete length)
        if not torch.compiler.is_compiling():  # a whole-model compile traces this itself (and refuses the call)
            torch._dynamo.maybe_mark_dynamic(cu, 0)
        return Varlen(cu, T)
    return document_mask(batch.seq_lens, T, device)


def checkpoint_policy(policy: str | None, n_layers: int) -> frozenset[int]:
    """Which block indices to recompute in backward: ``off`` | ``all`` | ``every:K`` (blocks 0, K,
    2K, ...) | ``selective`` (every block, but only its pointwise ops: see :func:`save_matmul_outputs`)."""
    if policy in (None, "", "off", "none", False):
        return frozenset()
    if policy in ("all", True, "selective"):
        return frozenset(range(n_layers))
    if isinstance(policy, str) and policy.startswith("every:"):
        try:
            k = int(policy.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return frozenset(range(0, n_layers, k))
    raise ValueError(f"gradient checkpointing policy {policy!r}: expected off, all or every:K (K >= 1)")


@functools.lru_cache(maxsize=1)  # asked by every checkpointed block in every forward and recompute
def _matmul_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: the matmuls and attention (the FLOPs);
    everything else in a block (norms, RoPE, SiLU * up, dropout, casts) is recomputed."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    varlen = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)
    if varlen is not None:
        ops.add(varlen.default)
    return frozenset(ops)


def recompute_scaled_matmuls() -> Any:
    """``context_fn`` of full checkpointing inside a compiled block: every op is recomputed as plain
    checkpointing asks, and the fp8 GEMMs (``aten._scaled_mm``, the fp8 bases) and nf4-fp8's conversion
    (``solotune::nf4_to_fp8``) *must* be: the min-cut partitioner of torch 2.11 otherwise saves their
    outputs instead of recomputing them (measured: a checkpointed 7B fp8 step at 23.3 GiB instead of
    ~14.4, benchmarks/results/frontier5-h200)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    # the fp8 GEMM, and nf4-fp8's conversion of its NF4 codes (a weight-sized e4m3 output)
    must = {"aten::_scaled_mm", "solotune::nf4_to_fp8"}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        name = op.name() if callable(getattr(op, "name", None)) else ""
        return CheckpointPolicy.MUST_RECOMPUTE if name in must else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def save_matmul_outputs() -> Any:
    """``context_fn`` of selective activation checkpointing (torch >= 2.4): save the outputs of
    :func:`_matmul_ops` in forward, recompute the rest in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _matmul_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.checkpoint_layers: frozenset[int] = frozenset()
        self.tie_weights()

    # ------------------------------------------------------------------ set-up
    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (re-run after
        ``load_state_dict(assign=True)``, which replaces the Parameter objects)."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) for matrices and embeddings, ones for norms) for benchmarks and tests."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)

    def set_grad_checkpointing(self, policy: str | None) -> None:
        """A named policy (:func:`checkpoint_policy`): off | all | every:K | selective."""
        self.checkpoint_blocks(checkpoint_policy(policy, len(self.layers)),
                               "selective" if policy == "selective" else "full")

    def checkpoint_blocks(self, blocks: Iterable[int], mode: str = "full") -> None:
        """Recompute exactly these blocks in backward (``mode``: full | selective); the rest keep
        their activations. Each block checkpoints itself (``TransformerBlock.recompute``)."""
        self.checkpoint_layers = frozenset(blocks)
        for i, layer in enumerate(self.layers):
            layer.recompute = mode if i in self.checkpoint_layers else "off"

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` every transformer block in place (names and state dict unchanged):
        Inductor fuses RMSNorm, RoPE, SwiGLU and the LoRA pointwise work into the matmuls' neighbours.
        One graph per block shape; a checkpointed block's graph includes its checkpoint."""
        for layer in self.layers:
            layer.compile(**options)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """Allocate a fresh static KV cache of ``max_len`` slots in every attention layer; returns them."""
        p = self.tok_embeddings.weight
        caches = [KVCache(batch, max_len, self.config.n_kv_heads, self.config.head_dim, dtype or p.dtype, p.device)
                  for _ in self.layers]
        self.attach_cache(caches)
        return caches

    def attach_cache(self, caches: list[KVCache]) -> None:
        """Put these caches (one per layer, from :meth:`setup_cache`) back in place: a compiled decoder
        reuses the same buffers across calls, so its CUDA graphs stay valid."""
        if len(caches) != len(self.layers):
            raise ValueError(f"{len(caches)} caches for {len(self.layers)} layers")
        for layer, cache in zip(self.layers, caches):
            layer.attention.kv_cache = cache

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def caches(self) -> Iterable[KVCache | None]:
        return (layer.attention.kv_cache for layer in self.layers)

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor | Batch, *, positions: torch.Tensor | None = None,
                cache_pos: int | None = None, key_mask: torch.Tensor | None = None,
                last_only: bool = False, head: Head | None = None) -> Any:
        """tokens [B, T] long (or a :class:`Batch`) -> logits [B, T, V] ([B, 1, V] with ``last_only``),
        or ``head(hidden [B, T, C], self.output)`` when a head is given (the loss owns the projection).

        A ``Batch`` brings its own RoPE positions and document boundaries: one document per row is
        plain causal attention (right padding is never attended to by a real token), several per
        row are block-diagonal causal. For generation:
        positions: RoPE positions [B, T]; default ``cache_pos + arange(T)`` (left-padded batches
            pass their own so every row starts at 0).
        cache_pos: None recomputes everything (no cache); otherwise these T tokens are written into
            the static KV cache at slots [cache_pos, cache_pos + T) and attend to the slots before
            them. The int 0 is prefill (attention over the T fresh keys, flash when unpadded); a 0-dim
            long tensor (or another int) attends over every cache slot under a mask, the same shapes
            at every position (what a compiled decode step needs).
        key_mask: [B, S'] bool with S' >= S, True where the slot holds a real token (padding = False).
        """
        mask: torch.Tensor | Varlen | None
        if isinstance(tokens, Batch):
            batch, tokens, positions = tokens, tokens.input_ids, tokens.positions
            mask = packed_attention(batch, tokens.device) if batch.packed else None
        else:
            B, T = tokens.shape
            if positions is None:
                first = cache_pos if cache_pos is not None else 0
                positions = (torch.arange(T, device=tokens.device) + first).expand(B, T)
            mask = self._mask(B, T, cache_pos, key_mask, tokens.device)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        for layer in self.layers:  # a block checkpoints itself (TransformerBlock.recompute)
            h = layer(h, cos, sin, mask, cache_pos)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return self.output(h) if head is None else head(h, self.output)

    def _mask(self, B: int, T: int, cache_pos: CachePos | None, key_mask: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | None:
        """Generation's boolean mask (causal over slots, padding keys off; see
        :func:`solotune.kv_cache.generation_mask`), or None when plain causal suffices."""
        cache = self.layers[0].attention.kv_cache if len(self.layers) else None
        return generation_mask(B, T, cache_pos, key_mask, None if cache is None else cache.max_len, device)


def build_model(cfg: ModelConfig, source: StateSource | None = None, *,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int | None = None, transform: TensorTransform | None = None) -> Transformer:
    """Build on the meta device (no memory), then materialise: from ``source`` one tensor at a
    time (:func:`load_weights`), or random-initialised (``seed``) when it is None.

    source: canonical names (no ``output.weight`` needed when embeddings are tied; one given is
        ignored): a dict ``{name: tensor}``, or an iterable of ``(name, tensor)`` pairs such as
        ``Checkpoint.tensors()``, which streams the file so host and device never hold the model twice.
    transform: ``(name, tensor [*shape], file dtype, host) -> tensor`` applied to each tensor as it
        arrives; default :func:`cast_to` ``(dtype, device)``. It may pick a dtype per tensor (e.g.
        norms fp32, matrices bf16). ``dtype``/``device`` only choose the default transform and the
        random init. To load into quantized modules (QLoRA), build on the meta device yourself,
        swap the Linears for quantized ones there, and call :func:`load_weights` with a transform
        that turns each ``[out, in]`` weight into what the swapped module holds (e.g. NF4 codes).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    if source is None:
        model = model.to(dtype).to_empty(device=device)  # dtype first: no full-size fp32 copy
        model.tie_weights()
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator=gen)
        return model
    return load_weights(model, source, transform=transform or cast_to(dtype, device))


StateSource = dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]  # canonical name -> tensor
TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]


def cast_to(dtype: torch.dtype, device: torch.device | str = "cpu") -> TensorTransform:
    """The default per-tensor transform: cast to ``dtype`` and move to ``device`` (no copy when the
    tensor already is both)."""
    device = torch.device(device)

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return transform


def load_weights(model: Transformer, source: StateSource, *, transform: TensorTransform) -> Transformer:
    """Fill ``model`` (built on the meta device, modules possibly swapped there) from ``source``,
    one tensor at a time: ``transform(name, t)`` is put in place of the meta parameter and the
    source tensor dropped before the next one is read, so the largest transient is one tensor
    (no dict of converted tensors). Raises KeyError naming missing and unexpected names (before
    reading anything when ``source`` is a dict), then re-ties the embeddings."""
    tied = model.config.tie_embeddings
    expected = {k for k in model.state_dict() if not (tied and k == "output.weight")}
    if hasattr(source, "keys"):  # a dict: check the names before any conversion work
        given = {k for k in source.keys() if not (tied and k == "output.weight")}
        _check_names(expected - given, given - expected)
        source = source.items()
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, t in source:
        if tied and name == "output.weight":
            pass
        elif name not in expected:
            unexpected.append(name)
        else:
            assign_tensor(model, name, transform(name, t))
            filled.add(name)
        del t  # before the next tensor is read
    _check_names(expected - filled, set(unexpected))
    model.tie_weights()
    return model


def _check_names(missing: set[str], unexpected: set[str]) -> None:
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {sorted(missing)[:8]}, "
                       f"unexpected {sorted(unexpected)[:8]}")


def assign_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Replace parameter (or buffer) ``name`` of ``model`` with ``t`` itself (no copy), keeping the
    parameter's ``requires_grad`` (floating tensors only: integer codes cannot require grad).
    ``t`` must have the shape the module holds, which on a swapped-in quantized module may be a
    packed one."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        old = module._parameters[leaf]
    elif leaf in module._buffers:
        old = module._buffers[leaf]
    else:
        raise KeyError(f"{name}: no such parameter or buffer in the model")
    if old is not None and tuple(t.shape) != tuple(old.shape):
        raise ValueError(f"{name}: shape {list(t.shape)} given, the model holds {list(old.shape)}")
    if leaf in module._parameters and not isinstance(t, nn.Parameter):
        grad = old is not None and old.requires_grad and (t.is_floating_point() or t.is_complex())
        t = nn.Parameter(t, requires_grad=grad)
    setattr(module, leaf, t)
