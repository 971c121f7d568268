"""Text generation: greedy, sampling (temperature / top-k / top-p) and beam search, with or without
the KV cache, eager or with a compiled decode step.

Shapes: B prompts, N beams, L longest prompt, S = L + max_new_tokens slots (rounded up to a
multiple of ``SLOT_BUCKET`` when compiled), V vocab.
Batches are left-padded to L: row i's real tokens sit in the last ``len(prompt_i)`` prompt slots,
its RoPE positions start at 0 on its first real token, and ``key_mask`` hides the padding slots, so
every row computes exactly what it would compute alone.

Decoding with the cache (``_sample_loop``): one eager prefill over the prompts fills the static KV
cache (solotune/kv_cache.py) and gives the first token; then one *decode step* per token — the
model on one token per row at a tensor slot, then the sampler (solotune/sampling.py) — whose
shapes never change, so a :class:`Decoder` with ``compile=True`` traces it once
(``torch.compile(fullgraph=True)``, on CUDA ``mode="reduce-overhead"``: a CUDA graph replayed per
token). Tokens stay on the device; stop tokens and ``stop_fn`` are checked on the host every
``check_every`` tokens (1 on CPU, where a sync costs nothing), so a GPU run syncs once per chunk.
"""

from __future__ import annotations

import heapq
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .sampling import check_sampling, draw_noise, pick, sample_next

__all__ = ["Decoder", "encode_prompt", "generate", "generate_tokens", "left_pad", "sample_next", "step_logits"]

StopFn = Callable[[int, list[int]], bool]  # (row, tokens generated so far) -> stop this row?
SLOT_BUCKET = 128  # compiled decoding: cache lengths rounded up to this, so nearby lengths share a graph
# Inductor options of the compiled decode step on CUDA: CUDA graphs (what mode="reduce-overhead" sets)
# and coordinate-descent tuning, under which Inductor turns each [B=1, C] x [C, N] matmul into a Triton
# reduction tuned per shape (cuBLAS's GEMV leaves bandwidth unused at batch 1: see benchmarks/NOTES.md).
CUDA_DECODE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


# ------------------------------------------------------------------------------------- batching
def left_pad(prompt_ids: Sequence[Sequence[int]], total: int, pad_id: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-pad prompts into ``total`` slots -> tokens [B, T] (pad after the prompts too),
    positions [B, T] (each row's first real token at 0), key_mask [B, T] (None when no padding)."""
    L = max(len(p) for p in prompt_ids)
    B = len(prompt_ids)
    tokens = torch.full((B, total), pad_id, dtype=torch.long)
    n_pad = torch.tensor([L - len(p) for p in prompt_ids])
    for i, p in enumerate(prompt_ids):
        tokens[i, L - len(p):L] = torch.tensor(p, dtype=torch.long)
    slots = torch.arange(total)[None, :]
    positions = (slots - n_pad[:, None]).clamp(min=0)
    key_mask = None if int(n_pad.max()) == 0 else slots >= n_pad[:, None]
    return tokens.to(device), positions.to(device), None if key_mask is None else key_mask.to(device)


def step_logits(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                 key_mask: torch.Tensor | None, start: int, end: int, kv_cache: bool) -> torch.Tensor:
    """Logits [rows, V] (fp32) for the token after slot ``end - 1``. With the cache only slots
    [start, end) are fed (earlier ones are cached); without it all of [0, end) are recomputed."""
    if kv_cache:
        out = model(tokens[:, start:end], positions=positions[:, start:end], cache_pos=start,
                    key_mask=key_mask, last_only=True)
    else:
        out = model(tokens[:, :end], positions=positions[:, :end],
                    key_mask=None if key_mask is None else key_mask[:, :end], last_only=True)
    return out[:, -1].float()


def reorder_cache(model: torch.nn.Module, index: torch.Tensor, filled: int) -> None:
    """Beam search: make cache row r hold what row ``index[r]`` held (slots [0, filled))."""
    for cache in model.caches():
        if cache is None:
            continue
        # in place: the buffers stay the objects the attention layers point at
        cache.k[:, :, :filled] = cache.k[:, :, :filled].index_select(0, index)
        cache.v[:, :, :filled] = cache.v[:, :, :filled].index_select(0, index)


# ------------------------------------------------------------------------------------- decoder
def decode_step(model: torch.nn.Module, temperature: float, top_k: int | None, top_p: float | None
                ) -> Callable[..., torch.Tensor]:
    """The per-token step for these sampling settings (what ``Decoder(compile=True)`` compiles):

    step(tok [B, 1] long, slot [] long, n_pad [B] long, key_mask [B, S] bool | None,
         noise [B, V] fp32 | None) -> next token [B] long

    ``tok`` is written into every layer's cache at ``slot`` (RoPE position ``slot - n_pad``, the
    row's left padding) and attends over all S slots; no Python value depends on the position.
    """
    def step(tok: torch.Tensor, slot: torch.Tensor, n_pad: torch.Tensor, key_mask: torch.Tensor | None,
             noise: torch.Tensor | None) -> torch.Tensor:
        positions = (slot - n_pad).clamp(min=0)[:, None]
        logits = model(tok, positions=positions, cache_pos=slot, key_mask=key_mask, last_only=True)[:, -1]
        return pick(logits.float(), temperature, top_k, top_p, noise)

    return step


class Decoder:
    """A model prepared for decoding: its decode steps (compiled or not) and, when compiled, its
    static KV cache, both kept between calls so that later calls replay the same graphs.

    Pass it where a model goes (:func:`generate_tokens`, :func:`generate`) to keep that state across
    calls. ``compile``: ``torch.compile(step, fullgraph=True, dynamic=False)`` with ``backend``
    and either ``mode`` or Inductor ``options`` (default ``mode="auto"``: on CUDA the options
    :data:`CUDA_DECODE_OPTIONS` — CUDA graphs plus GEMV tuning — elsewhere none);
    ``fallback``: when compiling fails, warn and decode eagerly instead of raising. The kept cache
    costs 2 · layers · B · Hkv · S · D elements until :meth:`release`.
    """

    def __init__(self, model: torch.nn.Module, *, compile: bool = False, backend: str = "inductor",
                 mode: str | None = "auto", options: dict | None = None, fallback: bool = False,
                 check_every: int | None = None) -> None:
        self.model = model
        self.compile = compile
        self.backend = backend
        if options is not None and mode not in (None, "auto"):
            raise ConfigError("Decoder: give mode or options, not both (torch.compile takes one)")
        on_cuda = self.device.type == "cuda"
        self.mode = None if mode == "auto" or options is not None else mode
        self.options = options if options is not None else (
            dict(CUDA_DECODE_OPTIONS) if mode == "auto" and on_cuda else None)
        self.fallback = fallback
        if check_every is not None and check_every < 1:
            raise ConfigError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every or (1 if self.device.type == "cpu" else 16)
        self._steps: dict[tuple, tuple[Callable, Callable]] = {}  # settings -> (maybe compiled, eager)
        self._caches: list | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def cache_len(self, needed: int) -> int:
        """Slots to allocate for ``needed`` (rounded up when compiled, never past max_seq_len)."""
        if not self.compile:
            return needed
        bucket = -(-needed // SLOT_BUCKET) * SLOT_BUCKET
        return max(needed, min(bucket, self.model.config.max_seq_len))

    def attach_cache(self, batch: int, max_len: int) -> None:
        """Give the model a static cache of [batch, max_len]: the kept one when it fits exactly."""
        dtype = self.model.tok_embeddings.weight.dtype
        if self._caches is not None and self._caches[0].matches(batch, max_len, dtype, self.device):
            self.model.attach_cache(self._caches)
            return
        caches = self.model.setup_cache(batch, max_len)
        if self.compile:
            self._caches = caches

    def release(self) -> None:
        """Free the kept KV cache (the compiled steps stay)."""
        self._caches = None
        self.model.clear_cache()

    def no_grad(self):
        """inference_mode when eager; no_grad when compiled (graph capture wants ordinary tensors)."""
        return torch.no_grad() if self.compile else torch.inference_mode()

    def step(self, temperature: float, top_k: int | None, top_p: float | None) -> Callable[..., torch.Tensor]:
        """The decode step for these settings (see :func:`decode_step`), compiled on first use when asked."""
        key = (temperature, top_k, top_p)
        if key not in self._steps:
            eager = decode_step(self.model, temperature, top_k, top_p)
            compiled = eager
            if self.compile:
                opts = {}
                if self.backend == "inductor":
                    opts = {"options": self.options} if self.options else {"mode": self.mode} if self.mode else {}
                compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend=self.backend, **opts)
            self._steps[key] = (compiled, eager)
        compiled, eager = self._steps[key]
        if compiled is eager or not self.fallback:
            return compiled

        def guarded(*args: torch.Tensor | None) -> torch.Tensor:
            try:
                return compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as e:  # tracing fails before any op runs
                warnings.warn(f"compiled decoding unavailable, decoding eagerly: {str(e).splitlines()[0]}")
                self._steps[key] = (eager, eager)
                return eager(*args)

        return guarded


class _RowEnds:
    """Host side of the stop checks: each row's tokens up to (and with) its stop token, or up to the
    token after which ``stop_fn`` said stop; fed the generated tokens one chunk at a time."""

    def __init__(self, rows: int, stop_ids: frozenset[int], stop_fn: StopFn | None) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.open = [True] * rows
        self.stop_ids, self.stop_fn = stop_ids, stop_fn

    def scan(self, chunk: list[list[int]]) -> bool:
        """Append each open row's chunk [B][n] up to its end; True once every row has ended."""
        for r, toks in enumerate(chunk):
            if not self.open[r]:
                continue
            mine = self.tokens[r]
            for t in toks:
                mine.append(t)
                if t in self.stop_ids or (self.stop_fn is not None and self.stop_fn(r, mine)):
                    self.open[r] = False
                    break
        return not any(self.open)


# --------------------------------------------------------------------------------- decode loops
def _sample_loop(dec: Decoder, prompt_ids: list[list[int]], max_new_tokens: int, *,
                 temperature: float, top_k: int | None, top_p: float | None, kv_cache: bool,
                 stop_ids: frozenset[int], pad_id: int, generator: torch.Generator | None,
                 stop_fn: StopFn | None) -> list[list[int]]:
    model, device = dec.model, dec.device
    B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    S = dec.cache_len(L + max_new_tokens) if kv_cache else L + max_new_tokens
    tokens, positions, key_mask = left_pad(prompt_ids, S, pad_id, device)
    V = model.config.vocab_size

    def noise() -> torch.Tensor | None:
        return draw_noise(B, V, device, generator) if temperature else None

    if kv_cache:
        dec.attach_cache(B, S)
        step = dec.step(temperature, top_k, top_p)
        n_pad = torch.tensor([L - len(p) for p in prompt_ids], device=device)
        slot = torch.full((), L, dtype=torch.long, device=device)  # where the next fed token goes
        tok = torch.empty(B, 1, dtype=torch.long, device=device)
    nxt = pick(step_logits(model, tokens, positions, key_mask, 0, L, kv_cache), temperature, top_k, top_p, noise())
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    ends = _RowEnds(B, stop_ids, stop_fn)
    checked = 0
    for i in range(max_new_tokens):
        if i:
            if kv_cache:
                tok.copy_(nxt[:, None])  # our buffer: a CUDA graph's output is overwritten by its next replay
                nxt = step(tok, slot, n_pad, key_mask, noise())
                slot += 1
            else:
                tokens[:, L + i - 1] = nxt
                logits = step_logits(model, tokens, positions, key_mask, 0, L + i, False)
                nxt = pick(logits, temperature, top_k, top_p, noise())
        out[:, i] = nxt
        if (i + 1) % dec.check_every == 0 or i == max_new_tokens - 1:
            if ends.scan(out[:, checked:i + 1].tolist()):  # the one host sync of the chunk
                break
            checked = i + 1
    return ends.tokens


def _beam_loop(model: torch.nn.Module, prompt_ids: list[list[int]], max_new_tokens: int, *,
               num_beams: int, length_penalty: float, kv_cache: bool, stop_ids: frozenset[int],
               pad_id: int, device: torch.device) -> list[list[int]]:
    """Beam search with HF ``transformers``' semantics (its defaults: early_stopping=False).

    Each step keeps the K = max(2, 1 + len(stop_ids)) * N best continuations of all N beams of a
    prompt. A continuation that ends in a stop token (or reaches ``max_new_tokens``) becomes a
    finished hypothesis, scored sum_logprobs / gen_len ** length_penalty, if it ranks in the top N
    of the K; the N best unfinished ones go on. A prompt is done once it holds N hypotheses and its
    best running beam, scored at the current length, cannot beat the worst of them.
    """
    B, N = len(prompt_ids), num_beams
    L = max(len(p) for p in prompt_ids)
    T = L + max_new_tokens
    tokens, positions, key_mask = left_pad(prompt_ids, T, pad_id, device)
    rows = torch.arange(B, device=device).repeat_interleave(N)  # beams of a prompt are adjacent rows
    tokens, positions = tokens[rows], positions[rows]
    key_mask = None if key_mask is None else key_mask[rows]
    if kv_cache:
        model.setup_cache(B * N, T)
    K = max(2, 1 + len(stop_ids)) * N
    running = torch.full((B, N), -1e9, device=device)
    running[:, 0] = 0.0  # only beam 0 is live at first: the N beams are copies of one prompt
    finished: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(B)]  # min-heaps (score, tie, tokens)
    done = [False] * B
    gen: list[list[int]] = [[] for _ in range(B * N)]  # tokens generated by each running beam
    tie = 0
    logits = step_logits(model, tokens, positions, key_mask, 0, L, kv_cache)
    for step in range(max_new_tokens):
        V = logits.shape[-1]
        scores = F.log_softmax(logits, dim=-1).view(B, N, V) + running[:, :, None]
        top_scores, top_idx = torch.topk(scores.view(B, N * V), K, dim=-1)  # sorted, best first
        top_beam, top_tok = top_idx // V, top_idx % V
        last = step == max_new_tokens - 1
        gen_len = step + 1
        s_l, b_l, t_l = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
        src, new_tok, new_scores = [], [], []
        for b in range(B):
            keep: list[tuple[int, int, float]] = []
            for rank in range(K):
                beam, tok, score = b_l[b][rank], t_l[b][rank], s_l[b][rank]
                if tok in stop_ids or last:
                    if rank < N and not done[b]:
                        hyp = (score / gen_len ** length_penalty, tie, gen[b * N + beam] + [tok])
                        tie += 1
                        if len(finished[b]) < N:
                            heapq.heappush(finished[b], hyp)
                        elif hyp[0] > finished[b][0][0]:
                            heapq.heapreplace(finished[b], hyp)
                elif len(keep) < N:
                    keep.append((beam, tok, score))
            while len(keep) < N:  # only at the last step, when nothing runs on
                keep.append((0, pad_id, -1e9))
            if not done[b] and len(finished[b]) == N and keep[0][2] / gen_len ** length_penalty <= finished[b][0][0]:
                done[b] = True  # no running beam can still beat the worst kept hypothesis
            for beam, tok, score in keep:
                src.append(b * N + beam)
                new_tok.append(tok)
                new_scores.append(score)
        if all(done) or last:
            break
        gen = [gen[r] + [t] for r, t in zip(src, new_tok)]
        index = torch.tensor(src, device=device)
        running = torch.tensor(new_scores, device=device).view(B, N)
        tokens = tokens.index_select(0, index)
        tokens[:, L + step] = torch.tensor(new_tok, device=device)
        if kv_cache:
            reorder_cache(model, index, L + step)
        logits = step_logits(model, tokens, positions, key_mask, L + step, L + step + 1, kv_cache)
    return [max(f)[2] for f in finished]


# ------------------------------------------------------------------------------------ public API
def generate_tokens(model: torch.nn.Module | Decoder, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    num_beams: int = 1, length_penalty: float = 1.0, kv_cache: bool = True,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int | None = None,
                    generator: torch.Generator | None = None, stop_fn: StopFn | None = None,
                    compile: bool = False) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt (lists of ids, any lengths >= 1).

    Returns the new tokens per prompt, ending with the stop token when one ended the row.
    ``kv_cache=False`` recomputes the whole prefix at every step (same tokens, slower).
    ``stop_fn(row, tokens_so_far)`` can end a row early (greedy/sampling only; beam search stops on
    ``stop_ids`` and length). ``seed`` (or ``generator``) makes sampling reproducible.
    ``model`` may be a :class:`Decoder` (its compiled steps and cache are kept between calls);
    otherwise ``compile=True`` builds a compiled one for this call. Beam search and the no-cache
    path always run eagerly. The model runs in eval mode without autograd; its training flag is
    restored and its KV cache detached afterwards (a compiled Decoder keeps its own).
    """
    dec = model if isinstance(model, Decoder) else Decoder(model, compile=compile)
    model = dec.model
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    if not prompt_ids:
        return []
    vocab = model.config.vocab_size
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ConfigError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= vocab:
            raise ConfigError(f"prompt {i} holds token id {max(p) if max(p) >= vocab else min(p)} outside the "
                             f"model's vocab (size {vocab})")
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]
    if num_beams < 1:
        raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and (temperature or top_k is not None or top_p is not None):
        raise ConfigError("beam search is deterministic here: leave temperature at 0 and top_k/top_p unset")
    total = max(len(p) for p in prompt_ids) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ConfigError(f"longest prompt + max_new_tokens = {total} exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}")
    device = dec.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = frozenset(int(s) for s in stop_ids)
    was_training = model.training
    model.eval()
    try:
        with dec.no_grad():
            if num_beams == 1:
                return _sample_loop(dec, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, kv_cache=kv_cache, stop_ids=stop, pad_id=pad_id,
                                    generator=generator, stop_fn=stop_fn)
            return _beam_loop(model, prompt_ids, max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                              kv_cache=kv_cache, stop_ids=stop, pad_id=pad_id, device=device)
    finally:
        model.clear_cache()
        model.train(was_training)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Prompt ids: ``text`` wrapped as one user turn of the chat template when ``chat``, with BOS
    in front when the model wants it (``tokenizer.add_bos``) and the template did not put it there."""
    if chat:
        text = tokenizer.apply_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def generate(model: torch.nn.Module | Decoder, tokenizer, prompts: str | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, kv_cache: bool = True, chat: bool = False,
             stop: list[str] | None = None, seed: int | None = None, compile: bool = False) -> list[str]:
    """Generate a completion for each prompt; returns the new text only (one string per prompt).

    Stops at the tokenizer's ``stop_ids`` (EOS, ``<|im_end|>``...), at any of the ``stop`` strings
    (cut from the output), or after ``max_new_tokens``. ``chat=True`` wraps each prompt as a user
    message in the model's chat template. See :func:`generate_tokens` for the other arguments.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    stop = [s for s in (stop or []) if s]
    stop_fn = None
    if stop:
        def stop_fn(row: int, toks: list[int]) -> bool:
            return _cut_at_stop(tokenizer.decode(toks), stop)[1]
    out = generate_tokens(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_beams=num_beams, length_penalty=length_penalty, kv_cache=kv_cache,
                          stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, seed=seed, stop_fn=stop_fn,
                          compile=compile)
    return [_cut_at_stop(tokenizer.decode(o), stop)[0] for o in out]
