"""Memory planner: predict every component of a fine-tuning run's peak memory from formulas.

The components (all in bytes, for one micro-batch of ``batch`` rows of ``seq_len`` tokens):

* **parameters**: every weight in its dtype (fp32, or bf16 in pure-bf16 mode), plus the LoRA
  adapters (always fp32: see ``solotune.train.precision``).
* **gradients**: one tensor per *trainable* parameter, in that parameter's dtype.
* **optimizer state**: ``torch.optim.AdamW`` keeps ``exp_avg`` and ``exp_avg_sq`` in the dtype of
  the parameter (``zeros_like``: bf16 weights get bf16 state) plus a 4-byte fp32 ``step`` tensor
  per parameter tensor.
* **saved activations**: the tensors autograd keeps for backward. They are counted by replaying
  the forward of :mod:`solotune.model` (and :class:`solotune.peft.LoRALinear`, and the training
  loop's loss) op by op with autograd's saving rules: a binary op saves operand *a* only when
  operand *b* needs a gradient (``mm`` saves the input only for a trainable weight, the weight only
  when the input needs a gradient), autocast casts every matmul input separately, views share a
  storage. On the tiny model this equals ``saved_tensors_hooks`` byte for byte (tests/bench).
* **autocast weight copies**: under fp16/bf16 autocast every fp32 weight is cast to 16 bits for
  its matmul. The copy of a *frozen* weight is a fresh tensor that backward keeps (to push the
  gradient through to the input); the copy of a *trainable* weight sits in autocast's cache for the
  whole forward and is kept by backward too. Either way ~2 bytes per weight: this, not the
  activations, is what makes fp16 AMP over fp32 weights *raise* the peak.
* **transients** ("rest"): the logits and their fp32 copy, the loss gradients at the start of
  backward, the block recomputed under gradient checkpointing, autocast's cache of trainable
  weights in checkpointed blocks, the optimizer's scratch. Modelled, not exact.

``peak = max(forward/backward phase, optimizer-step phase)``, both in steady state (optimizer
state allocated; with accumulation the window's gradients already exist while the next
micro-batch runs).

Shapes: N = batch * seq_len tokens, C model dim, F FFN dim, V vocab, H heads, D head dim, L layers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import PRESETS, ModelConfig
from ..model import checkpoint_policy

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "bool": 1}
PRECISIONS = ("fp32", "fp16-amp", "bf16-amp", "bf16")
GiB = 1024**3

# Relative throughput of one training token per precision on a tensor-core GPU, used only to rank
# configurations (fp32 matmuls run without TF32, as torch does by default).
PRECISION_SPEED = {"fp32": 1.0, "fp16-amp": 3.0, "bf16-amp": 3.0, "bf16": 3.6}


# =========================================================================== configuration
@dataclass(frozen=True)
class Setup:
    """One training configuration, as the planner sees it."""

    model: ModelConfig
    seq_len: int = 512  # tokens per row of the longest micro-batch
    batch: int = 1  # rows per micro-batch
    grad_accum: int = 1
    grad_checkpoint: str = "off"  # off | all | every:K
    precision: str = "fp32"  # fp32 | fp16-amp | bf16-amp | bf16
    lora_rank: int = 16  # 0 = full fine-tuning
    lora_targets: tuple[str, ...] = ("wq", "wv")
    lora_dropout: float = 0.05
    device: str = "cuda"  # "cuda" | "cpu": dropout masks and attention statistics differ

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.seq_len < 1 or self.batch < 1 or self.grad_accum < 1:
            raise ValueError(f"seq_len, batch and grad_accum must be >= 1 (got {self.seq_len}, {self.batch}, {self.grad_accum})")
        checkpoint_policy(self.grad_checkpoint, self.model.n_layers)  # validates

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def method(self) -> str:
        return "lora" if self.lora else "full"

    @property
    def amp(self) -> bool:
        return self.precision.endswith("-amp")

    @property
    def compute_dtype(self) -> str:
        return {"fp16-amp": "fp16", "bf16-amp": "bf16", "bf16": "bf16"}.get(self.precision, "fp32")

    @property
    def param_dtype(self) -> str:
        return "bf16" if self.precision == "bf16" else "fp32"

    def replace(self, **changes: Any) -> "Setup":
        return dataclasses.replace(self, **changes)


@dataclass
class Prediction:
    """Predicted bytes per component; ``peak`` is the larger of the two phases."""

    setup: Setup
    params: dict[str, int]  # dtype -> bytes
    trainable_params: int
    total_params: int
    grads: int
    optimizer: int
    activations: int  # saved for backward (model + loss), one micro-batch
    weight_copies: int  # autocast's 16-bit weight copies kept for backward
    autocast_cache: int  # 16-bit copies of trainable weights held by autocast during the forward
    activations_by_part: dict[str, int]
    transient_fb: int  # forward/backward transients on top of the resident components
    transient_step: int
    peak_fb: int
    peak_step: int

    @property
    def params_total(self) -> int:
        return sum(self.params.values())

    @property
    def peak(self) -> int:
        return max(self.peak_fb, self.peak_step)

    @property
    def peak_phase(self) -> str:
        return "forward/backward" if self.peak_fb >= self.peak_step else "optimizer step"

    def anatomy(self) -> dict[str, Any]:
        """The same keys as the measured anatomy (``solotune.bench.anatomy``)."""
        fb = self.peak_fb >= self.peak_step
        grads_live = self.grads if (not fb or self.setup.grad_accum > 1) else 0
        acts = self.activations if fb else 0
        copies = self.weight_copies if fb else 0
        parts = self.params_total + grads_live + self.optimizer + acts + copies
        return {
            "phase": self.peak_phase, "peak": self.peak, "params": dict(self.params), "params_total": self.params_total,
            "grads": grads_live, "optimizer": self.optimizer, "activations": acts, "weight_copies": copies,
            "rest": self.peak - parts, "autocast_cache": self.autocast_cache,
        }

    def to_dict(self) -> dict[str, Any]:
        s = self.setup
        return {
            "model": s.model.name, "layers": s.model.n_layers, "seq_len": s.seq_len, "batch": s.batch,
            "grad_accum": s.grad_accum, "grad_checkpoint": s.grad_checkpoint, "precision": s.precision,
            "method": s.method, "trainable_params": self.trainable_params, "total_params": self.total_params,
            "params": dict(self.params), "grads": self.grads, "optimizer": self.optimizer,
            "activations": self.activations, "weight_copies": self.weight_copies,
            "autocast_cache": self.autocast_cache, "activations_by_part": dict(self.activations_by_part),
            "transient_fb": self.transient_fb, "transient_step": self.transient_step,
            "peak_fb": self.peak_fb, "peak_step": self.peak_step, "peak": self.peak, "peak_phase": self.peak_phase,
        }


# ================================================================== parameters and optimizer
def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each Linear of one block."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return {"wq": (cfg.n_heads * cfg.head_dim, cfg.dim), "wk": (kv, cfg.dim), "wv": (kv, cfg.dim),
            "wo": (cfg.dim, cfg.n_heads * cfg.head_dim), "w1": (cfg.hidden_dim, cfg.dim),
            "w2": (cfg.dim, cfg.hidden_dim), "w3": (cfg.hidden_dim, cfg.dim)}


def param_tensors(s: Setup) -> list[tuple[str, int, str, bool]]:
    """Every parameter tensor once: (name, numel, dtype, trainable). Tied heads appear once."""
    cfg, pdt = s.model, s.param_dtype
    full = not s.lora
    out: list[tuple[str, int, str, bool]] = [("tok_embeddings.weight", cfg.vocab_size * cfg.dim, pdt, full)]
    shapes = _linear_shapes(cfg)
    for i in range(cfg.n_layers):
        for name, (o, n_in) in shapes.items():
            out.append((f"layers.{i}.{name}.weight", o * n_in, pdt, full))
            if s.lora and name in s.lora_targets:
                out.append((f"layers.{i}.{name}.lora_a", s.lora_rank * n_in, "fp32", True))
                out.append((f"layers.{i}.{name}.lora_b", o * s.lora_rank, "fp32", True))
        out.append((f"layers.{i}.attention_norm.weight", cfg.dim, pdt, full))
        out.append((f"layers.{i}.ffn_norm.weight", cfg.dim, pdt, full))
    out.append(("norm.weight", cfg.dim, pdt, full))
    if not cfg.tie_embeddings:
        out.append(("output.weight", cfg.vocab_size * cfg.dim, pdt, full))
    return out


def param_bytes(s: Setup) -> dict[str, int]:
    by: dict[str, int] = {}
    for _, n, dt, _ in param_tensors(s):
        by[dt] = by.get(dt, 0) + n * BYTES[dt]
    return by


def grad_bytes(s: Setup) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return sum(n * BYTES[dt] for _, n, dt, tr in param_tensors(s) if tr)


def optimizer_bytes(s: Setup) -> int:
    """AdamW: exp_avg + exp_avg_sq in the parameter's dtype, and a 4-byte fp32 ``step`` per tensor."""
    return sum(2 * n * BYTES[dt] + 4 for _, n, dt, tr in param_tensors(s) if tr)


# ======================================================================= saved activations
@dataclass
class _T:
    """A symbolic tensor: element count, dtype, requires_grad, storage id."""

    numel: int
    dtype: str
    rg: bool
    sid: int


@dataclass
class _W:
    """A weight used by a matmul: name, element count, dtype, trainable."""

    name: str
    numel: int
    dtype: str
    rg: bool


@dataclass
class _Tape:
    """Storages saved for backward, replaying autograd's rules on symbolic tensors."""

    s: Setup
    tokens: int
    saved: dict[int, tuple[int, str]] = field(default_factory=dict)  # sid -> (bytes, part)
    copies: int = 0  # 16-bit weight copies saved for backward
    cache: dict[str, int] = field(default_factory=dict)  # trainable weight -> bytes of its autocast copy
    _ids: Iterable[int] = field(default_factory=lambda: itertools.count())

    def new(self, numel: int, dtype: str, rg: bool) -> _T:
        return _T(numel, dtype, rg, next(self._ids))  # type: ignore[call-overload]

    def save(self, t: _T, part: str) -> None:
        self.saved.setdefault(t.sid, (t.numel * BYTES[t.dtype], part))

    def total(self) -> int:
        return sum(b for b, _ in self.saved.values())

    def by_part(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b, part in self.saved.values():
            out[part] = out.get(part, 0) + b
        return out


def _promote(a: str, b: str) -> str:
    if a == b:
        return a
    if "fp32" in (a, b):
        return "fp32"
    raise ValueError(f"no promotion rule for {a} and {b}")


class _Forward:
    """The forward of solotune's Transformer + LoRA + the loop's loss, on symbolic tensors."""

    def __init__(self, tape: _Tape) -> None:
        self.t = tape
        s = tape.s
        self.s, self.cfg, self.N = s, s.model, tape.tokens
        self.lp = s.compute_dtype if s.amp else None  # autocast's 16-bit dtype
        self.full = not s.lora

    # ------------------------------------------------------------------ primitives
    def linear(self, x: _T, out_features: int, w: _W, part: str) -> _T:
        """F.linear(x, w) (3-D input: a 2-D ``mm`` on a view of x). Under autocast both operands
        are cast to 16 bits first (x per call; a trainable fp32 weight once, via the cache)."""
        t, copy = self.t, False
        if self.lp is not None:
            if x.dtype != self.lp:
                x = t.new(x.numel, self.lp, x.rg)
            if w.dtype != self.lp:
                copy = True
                if w.rg:
                    t.cache[w.name] = w.numel * BYTES[self.lp]
        rg = x.rg or w.rg
        if w.rg:
            t.save(x, part)  # mm saves its input for the weight gradient
        if x.rg and copy:
            t.copies += w.numel * BYTES[self.lp]  # ... and the (16-bit copy of the) weight for the input gradient
        return t.new(self.N * out_features, self.lp or _promote(x.dtype, w.dtype), rg)

    def rmsnorm(self, x: _T, part: str) -> _T:
        """xf = x.float(); xf * rsqrt(mean(xf^2) + eps) -> .to(x.dtype) -> weight * (.)"""
        t = self.t
        xf = x if x.dtype == "fp32" else t.new(x.numel, "fp32", x.rg)
        if xf.rg:
            r = t.new(self.N, "fp32", True)
            t.save(xf, part)  # pow (and the mul by rsqrt)
            t.save(r, part)  # rsqrt's result (and the mul)
        xn = t.new(x.numel, "fp32", xf.rg)
        xo = xn if x.dtype == "fp32" else t.new(x.numel, x.dtype, xn.rg)
        w_rg, w_dtype = self.full, self.s.param_dtype
        if w_rg:
            t.save(xo, part)  # weight * xo saves xo for the weight's gradient
        return t.new(x.numel, _promote(w_dtype, xo.dtype), xo.rg or w_rg)

    def rope(self, x: _T, cos: _T, sin: _T) -> _T:
        """Adjacent-pair rotation: four muls by cos/sin (saved when x needs a gradient), a stack."""
        if x.rg:
            self.t.save(cos, "rope")
            self.t.save(sin, "rope")
        return self.t.new(x.numel, _promote(x.dtype, cos.dtype), x.rg)

    def proj(self, x: _T, layer: int, name: str, part: str) -> _T:
        """A block Linear, wrapped in LoRALinear when targeted."""
        o, n_in = _linear_shapes(self.cfg)[name]
        s, t = self.s, self.t
        base = _W(f"layers.{layer}.{name}.weight", o * n_in, s.param_dtype, self.full)
        y = self.linear(x, o, base, part)
        if not (s.lora and name in s.lora_targets):
            return y
        # LoRALinear: y + (B(A(dropout(x).to(fp32))) * scale).to(y.dtype)
        d = x
        if s.lora_dropout > 0:
            if x.rg:  # CUDA's fused dropout keeps a bool mask; CPU multiplies by a float noise tensor
                t.save(t.new(x.numel, "bool" if s.device == "cuda" else x.dtype, False), "lora")
            d = t.new(x.numel, x.dtype, x.rg)
        h = d if d.dtype == "fp32" else t.new(d.numel, "fp32", d.rg)
        a = self.linear(h, s.lora_rank, _W(f"layers.{layer}.{name}.lora_a", s.lora_rank * n_in, "fp32", True), "lora")
        b = self.linear(a, o, _W(f"layers.{layer}.{name}.lora_b", o * s.lora_rank, "fp32", True), "lora")
        b = t.new(b.numel, b.dtype, b.rg)  # * scale
        if b.dtype != y.dtype:
            b = t.new(b.numel, y.dtype, b.rg)
        return t.new(y.numel, y.dtype, True)

    # ------------------------------------------------------------------ the model
    def block(self, x: _T, i: int, cos: _T, sin: _T) -> _T:
        cfg, t, N = self.cfg, self.t, self.N
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        xn = self.rmsnorm(x, "norm")
        q = self.rope(self.proj(xn, i, "wq", "attention"), cos, sin)
        k = self.rope(self.proj(xn, i, "wk", "attention"), cos, sin)
        v = self.proj(xn, i, "wv", "attention")
        if Hkv != H:  # repeat_interleave: a fresh [B, H, T, D] copy of k and v
            k, v = t.new(N * H * D, k.dtype, k.rg), t.new(N * H * D, v.dtype, v.rg)
        if self.lp is not None:  # autocast casts SDPA's inputs
            q, k, v = (z if z.dtype == self.lp else t.new(z.numel, self.lp, z.rg) for z in (q, k, v))
        rg = q.rg or k.rg or v.rg
        y = t.new(N * H * D, q.dtype, rg)
        if rg:
            for z in (q, k, v, y):
                t.save(z, "attention")
            # softmax log-sum-exp per query row, fp32 (CUDA's fp32 kernel pads rows to 32)
            rows = self.s.batch * H * (-(-self.s.seq_len // 32) * 32 if self.s.device == "cuda" and q.dtype == "fp32"
                                       else self.s.seq_len)
            t.save(t.new(rows, "fp32", False), "attention")
        # y.transpose(1, 2).reshape(B, T, C) is a view: SDPA writes its output in [B, T, H, D] order
        a = self.proj(y, i, "wo", "attention")
        h = t.new(x.numel, _promote(x.dtype, a.dtype), x.rg or a.rg)
        hn = self.rmsnorm(h, "norm")
        g = self.proj(hn, i, "w1", "mlp")
        u = self.proj(hn, i, "w3", "mlp")
        if g.rg:
            t.save(g, "mlp")  # silu saves its input
        sg = t.new(g.numel, g.dtype, g.rg)
        if u.rg:
            t.save(sg, "mlp")
        if sg.rg:
            t.save(u, "mlp")
        m = t.new(g.numel, _promote(sg.dtype, u.dtype), sg.rg or u.rg)
        f = self.proj(m, i, "w2", "mlp")
        return t.new(x.numel, _promote(h.dtype, f.dtype), h.rg or f.rg)

    def run(self) -> dict[str, Any]:
        """Replay one micro-batch; returns the tape's totals and the transients the peak model needs."""
        s, cfg, t, N = self.s, self.cfg, self.t, self.N
        pdt = s.param_dtype
        tokens = t.new(N, "i64", False)
        if self.full:
            t.save(tokens, "embedding")  # embedding backward needs the indices
        h = t.new(N * cfg.dim, pdt, self.full)
        cos = t.new(N * cfg.head_dim // 2, pdt, False)
        sin = t.new(N * cfg.head_dim // 2, pdt, False)
        ckpt = checkpoint_policy(s.grad_checkpoint, cfg.n_layers)
        recompute = 0  # the largest block recomputed in backward (its saved tensors + weight copies)
        for i in range(cfg.n_layers):
            if i in ckpt:
                for z in (h, cos, sin):
                    t.save(z, "checkpoint inputs")  # non-reentrant checkpoint saves the block's inputs
                scratch = _Tape(s, N, _ids=t._ids)
                sub = _Forward(scratch)
                h_out = sub.block(h, i, cos, sin)
                t.cache.update(scratch.cache)
                recompute = max(recompute, scratch.total() + scratch.copies)
                h = h_out
            else:
                h = self.block(h, i, cos, sin)
        hn = self.rmsnorm(h, "head+loss")
        head = _W("tok_embeddings.weight" if cfg.tie_embeddings else "output.weight", cfg.vocab_size * cfg.dim,
                  pdt, self.full)
        logits = self.linear(hn, cfg.vocab_size, head, "head+loss")
        # token_loss_sum: targets = pad(labels[:, 1:]) (new int64 [B, T]); cross_entropy on logits.float()
        lf = logits if logits.dtype == "fp32" else t.new(logits.numel, "fp32", logits.rg)
        if lf.rg:
            t.save(t.new(lf.numel, "fp32", True), "head+loss")  # log_softmax result (nll_loss saves it too)
            t.save(t.new(N, "i64", False), "head+loss")  # targets
            t.save(t.new(1, "fp32", False), "head+loss")  # nll_loss total_weight
            if s.precision == "fp16-amp":
                t.save(t.new(1, "fp32", False), "head+loss")  # GradScaler.scale multiplies by its scale tensor
        return {"logits": logits.numel * BYTES[logits.dtype], "logits_fp32": 0 if lf is logits else lf.numel * 4,
                "recompute": recompute}


def saved_activations(s: Setup) -> tuple[int, int, dict[str, int], dict[str, int], dict[str, int]]:
    """(saved activation bytes, saved weight-copy bytes, bytes by part, autocast cache by weight,
    transient sizes) for one micro-batch of ``s.batch`` x ``s.seq_len`` tokens."""
    tape = _Tape(s, s.batch * s.seq_len)
    extra = _Forward(tape).run()
    return tape.total(), tape.copies, tape.by_part(), dict(tape.cache), extra


# ================================================================================ the peak
def predict(s: Setup) -> Prediction:
    """Every component and the two phase peaks of ``s`` (steady state)."""
    cfg, N = s.model, s.batch * s.seq_len
    params = param_bytes(s)
    tensors = param_tensors(s)
    trainable = sum(n for _, n, _, tr in tensors if tr)
    total = sum(n for _, n, _, _ in tensors)
    grads, opt = grad_bytes(s), optimizer_bytes(s)
    acts, copies, parts, cache, extra = saved_activations(s)
    cache_total = sum(cache.values())
    ckpt = checkpoint_policy(s.grad_checkpoint, cfg.n_layers)
    # Trainable weights whose 16-bit copy is not kept by backward (checkpointed blocks) still sit
    # in autocast's cache until the forward ends.
    cache_unsaved = 0
    if s.amp and ckpt:
        cache_unsaved = sum(b for name, b in cache.items() if _layer_of(name) in ckpt)
    logits, logits_f = extra["logits"], extra["logits_fp32"]
    # End of forward: + logits (+ the unsaved cache). Loss: + the fp32 copy of the logits while
    # log_softmax runs. Start of backward: the logits stay alive (the loop holds them until the
    # backward is done) + d(log_softmax) and d(logits) in fp32 (+ the head's weight gradient).
    head_grad = cfg.vocab_size * cfg.dim * BYTES[s.param_dtype] if not s.lora else 0
    fwd_end = cache_unsaved + logits
    loss = logits + logits_f
    bwd_start = logits + 2 * N * cfg.vocab_size * 4 + head_grad
    bwd_ckpt = logits + extra["recompute"] + (head_grad if ckpt else 0)
    transient_fb = max(fwd_end, loss, bwd_start, bwd_ckpt)
    grads_fb = grads if s.grad_accum > 1 else 0
    # Gradients grow while activations are freed: when the gradients are the bigger of the two
    # (full fine-tuning) the end of backward holds all of them and the activations are gone.
    peak_fb = sum(params.values()) + opt + grads_fb + max(acts + copies + transient_fb, grads - grads_fb)
    # Optimizer step: fused AdamW on CUDA works in place; the CPU loop has per-tensor scratch.
    largest = max((n * BYTES[dt] for _, n, dt, tr in tensors if tr), default=0)
    transient_step = 0 if s.device == "cuda" else 2 * largest
    peak_step = sum(params.values()) + grads + opt + transient_step
    return Prediction(s, params, trainable, total, grads, opt, acts, copies, cache_total, parts,
                      transient_fb, transient_step, peak_fb, peak_step)


def _layer_of(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ====================================================================== FLOPs and runtime
def matmul_params(s: Setup) -> tuple[int, int]:
    """(weights every token multiplies through, the trainable ones among them). The embedding is a
    lookup (no FLOPs); the head is a matmul even when tied."""
    cfg = s.model
    total = trainable = 0
    for name, n, _, tr in param_tensors(s):
        if name.endswith("norm.weight") or name == "tok_embeddings.weight":
            continue
        total += n
        trainable += n if tr else 0
    head = cfg.vocab_size * cfg.dim
    if cfg.tie_embeddings:
        total += head
        trainable += head if not s.lora else 0
    return total, trainable


def train_flops(s: Setup, rows: Iterable[int]) -> float:
    """Model FLOPs of one training pass over micro-batch rows of the given lengths.

    forward: 2 * N_mm per token + causal attention (2 * T * C per token per layer for QK^T and PV);
    backward: the input gradients through every matmul (2 * N_mm, even through frozen weights) +
    the weight gradients of the trainable ones (2 * N_trainable) + twice the attention.
    Recomputation under checkpointing is not model FLOPs and is not counted.
    """
    n_mm, n_tr = matmul_params(s)
    cfg = s.model
    flops = 0.0
    for T in rows:
        attn = 2.0 * T * T * cfg.dim * cfg.n_layers  # causal: half of 2 matmuls of 2*T*T*C
        fwd = 2.0 * n_mm * T + attn
        flops += fwd + (2.0 * n_mm * T + 2.0 * n_tr * T + 2 * attn)
    return flops


def relative_cost(s: Setup) -> float:
    """A unitless time per token for ranking: FLOPs (+ the recomputed forward of checkpointed
    blocks) over the precision's relative speed."""
    T = s.seq_len
    base = train_flops(s, [T] * s.batch)
    n_ckpt = len(checkpoint_policy(s.grad_checkpoint, s.model.n_layers))
    n_mm, _ = matmul_params(s)
    block_fwd = 2.0 * (n_mm - s.model.vocab_size * s.model.dim) / max(s.model.n_layers, 1) * T + 2.0 * T * T * s.model.dim
    recompute = n_ckpt * block_fwd * s.batch
    return (base + recompute) / PRECISION_SPEED[s.precision] / (s.batch * T)


# ============================================================================= plan listing
def parse_bytes(text: str | int | float) -> int:
    """'24GiB', '24G', '80GB', '1.5TiB', '512MiB' or a plain number of bytes -> bytes. GB means
    10^9, GiB (and a bare G) 2^30."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if not m:
        raise ValueError(f"memory size {text!r}: expected a number with a unit, e.g. 24GiB, 80GB, 512MiB")
    num, unit, i, _ = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    base = 1000 if (unit and not i and m.group(4)) else 1024
    return int(float(num) * base**power)


def fmt_gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def model_config(name_or_path: str, layers: int | None = None) -> ModelConfig:
    """A preset name or a checkpoint path (its config only; no weights are read)."""
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]
    else:
        cfg = _config_from_path(Path(name_or_path))
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg = cfg.replace(n_layers=layers)
    return cfg


def _config_from_path(p: Path) -> ModelConfig:
    from ..checkpoint import resolve

    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint, and not a preset ({', '.join(sorted(PRESETS))})")
    kind, path = resolve(p)
    if kind == "hf":
        return ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()), name=path.name)
    if kind == "meta":
        params = json.loads((path / "params.json").read_text())
        vocab = params.get("vocab_size", -1)
        if vocab is None or int(vocab) <= 0:
            params = {**params, "vocab_size": 32000}  # LLaMA-1/2 params.json say -1: the tokenizer's 32000
        return ModelConfig.from_meta_params(params, name=path.name)
    from ..checkpoint.gguf import _open, read_metadata

    reader = _open(path)
    meta = read_metadata(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig.from_gguf_metadata(meta, name=path.stem, tied=tied)


PLAN_CHECKPOINTING = ("off", "every:4", "every:2", "all")


def plan(model: ModelConfig, gpu_mem: int, seq_len: int = 512, batch: int = 1, grad_accum: int = 8,
         lora_rank: int = 16, lora_targets: tuple[str, ...] = ("wq", "wv"), lora_dropout: float = 0.05,
         methods: tuple[str, ...] = ("lora", "full"), precisions: tuple[str, ...] = PRECISIONS,
         checkpointing: tuple[str, ...] = PLAN_CHECKPOINTING) -> list[tuple[Prediction, float, bool]]:
    """Every configuration as (prediction, relative cost, fits), fitting ones first, fastest first."""
    rows = []
    for method, prec, gc in itertools.product(methods, precisions, checkpointing):
        if gc.startswith("every:") and int(gc.split(":")[1]) >= model.n_layers:
            continue
        s = Setup(model, seq_len=seq_len, batch=batch, grad_accum=grad_accum, grad_checkpoint=gc, precision=prec,
                  lora_rank=lora_rank if method == "lora" else 0, lora_targets=lora_targets,
                  lora_dropout=lora_dropout)
        p = predict(s)
        rows.append((p, relative_cost(s), p.peak <= gpu_mem))
    rows.sort(key=lambda r: (not r[2], r[1], r[0].peak))
    return rows


def format_plan(rows: list[tuple[Prediction, float, bool]], gpu_mem: int, show_all: bool = False) -> str:
    """The ``solotune plan`` table (GiB)."""
    fit = [r for r in rows if r[2]]
    best = min((c for _, c, _ in rows), default=1.0)
    head = ("| # | method | precision | checkpointing | peak | params | grads | optimizer | activations | "
            "weight copies | transients | rel. time |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = []

    def row(i: int, p: Prediction, cost: float) -> str:
        s = p.setup
        return (f"| {i} | {s.method} | {s.precision} | {s.grad_checkpoint} | {fmt_gib(p.peak)} | "
                f"{fmt_gib(p.params_total)} | {fmt_gib(p.grads)} | {fmt_gib(p.optimizer)} | {fmt_gib(p.activations)} | "
                f"{fmt_gib(p.weight_copies)} | {fmt_gib(p.peak - p.params_total - p.grads - p.optimizer - p.activations - p.weight_copies)} | "
                f"{cost / best:.2f} |")

    if rows:
        s = rows[0][0].setup
        lines.append(f"{s.model.name}: {s.model.n_layers} layers, seq_len {s.seq_len}, micro-batch {s.batch}, "
                     f"gradient accumulation {s.grad_accum}; GPU memory {fmt_gib(gpu_mem)} GiB. Sizes in GiB.")
    lines.append(f"\nFits ({len(fit)} of {len(rows)}), fastest first:\n")
    if fit:
        lines.append(head)
        lines.extend(row(i + 1, p, c) for i, (p, c, _) in enumerate(fit))
    else:
        lines.append("(nothing fits)")
    rest = [r for r in rows if not r[2]]
    if rest and show_all:
        lines.append(f"\nDoes not fit ({len(rest)}):\n")
        lines.append(head)
        lines.extend(row(i + 1, p, c) for i, (p, c, _) in enumerate(rest))
    elif rest:
        lines.append(f"\n{len(rest)} more configurations do not fit (--all lists them).")
    lines.append("\nrel. time: model FLOPs + recomputation over a per-precision speed factor "
                 f"({', '.join(f'{k} {v:g}x' for k, v in PRECISION_SPEED.items())}); a ranking, not a measurement.")
    return "\n".join(lines)
