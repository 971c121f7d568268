"""Text generation: greedy, sampling (temperature / top-k / top-p) and beam search, with or without
the KV cache.

Shapes: B prompts, N beams, L longest prompt, T = L + max_new_tokens slots, V vocab.
Batches are left-padded to L: row i's real tokens sit in the last ``len(prompt_i)`` prompt slots,
its RoPE positions start at 0 on its first real token, and ``key_mask`` hides the padding slots, so
every row computes exactly what it would compute alone.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError

StopFn = Callable[[int, list[int]], bool]  # (row, tokens generated so far) -> stop this row?


# ------------------------------------------------------------------------------------ sampling
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V] -> [B] long.

    temperature 0 is greedy (argmax; top-k/top-p are then moot). Otherwise the logits are divided
    by the temperature, cut to the ``top_k`` best, then to the smallest set whose probability
    reaches ``top_p``, and one token is drawn with ``generator``.
    """
    if temperature is None or temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the best always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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


# --------------------------------------------------------------------------------- decode loops
def _sample_loop(model: torch.nn.Module, prompt_ids: list[list[int]], max_new_tokens: int, *,
                 temperature: float, top_k: int | None, top_p: float | None, kv_cache: bool,
                 stop_ids: frozenset[int], pad_id: int, generator: torch.Generator | None,
                 stop_fn: StopFn | None, device: torch.device) -> list[list[int]]:
    B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    T = L + max_new_tokens
    tokens, positions, key_mask = left_pad(prompt_ids, T, pad_id, device)
    if kv_cache:
        model.setup_cache(B, T)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    done_t = torch.zeros(B, dtype=torch.bool, device=device)
    logits = step_logits(model, tokens, positions, key_mask, 0, L, kv_cache)  # prefill
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = nxt.masked_fill(done_t, pad_id)  # finished rows keep emitting pad (dropped below)
        tokens[:, L + step] = nxt
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            if t in stop_ids or (stop_fn is not None and stop_fn(i, out[i])):
                done[i] = True
        if all(done) or step == max_new_tokens - 1:
            break
        done_t = torch.tensor(done, device=device)
        logits = step_logits(model, tokens, positions, key_mask, L + step, L + step + 1, kv_cache)
    return out


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
def generate_tokens(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    num_beams: int = 1, length_penalty: float = 1.0, kv_cache: bool = True,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int | None = None,
                    generator: torch.Generator | None = None, stop_fn: StopFn | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt (lists of ids, any lengths >= 1).

    Returns the new tokens per prompt, ending with the stop token when one ended the row.
    ``kv_cache=False`` recomputes the whole prefix at every step (same tokens, slower).
    ``stop_fn(row, tokens_so_far)`` can end a row early (greedy/sampling only; beam search stops on
    ``stop_ids`` and length). ``seed`` (or ``generator``) makes sampling reproducible.
    The model runs in eval mode under ``torch.inference_mode()``; its training flag is restored
    and its KV cache freed afterwards.
    """
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
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = frozenset(int(s) for s in stop_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if num_beams == 1:
                return _sample_loop(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, kv_cache=kv_cache, stop_ids=stop, pad_id=pad_id,
                                    generator=generator, stop_fn=stop_fn, device=device)
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


def generate(model: torch.nn.Module, tokenizer, prompts: str | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, kv_cache: bool = True, chat: bool = False,
             stop: list[str] | None = None, seed: int | None = None) -> list[str]:
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
                          stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, seed=seed, stop_fn=stop_fn)
    return [_cut_at_stop(tokenizer.decode(o), stop)[0] for o in out]
