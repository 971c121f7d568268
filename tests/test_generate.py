"""Generation tests on tiny random models: KV cache == recompute, left-padded batches == one prompt
at a time, compiled decode step == eager (one graph for every token and call), beam search == HF
transformers, sampling controls and the exponential race, stops checked in chunks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from solotune.checkpoint.names import HF_TO_CANONICAL, hf_rows_to_meta, rename
from solotune.config import ModelConfig
from solotune.generate import Decoder, encode_prompt, generate, generate_tokens, left_pad, sample_next, step_logits
from solotune.kv_cache import KVCache, generation_mask
from solotune.model import build_model
from solotune.sampling import draw_noise, pick

TINY = ModelConfig.from_name("tiny")  # vocab 256, GQA 4/2
PROMPTS = [[1, 5, 7, 9, 11, 13], [1, 3], [1, 100, 200, 30], [7]]


@pytest.fixture(scope="module")
def tiny():
    return build_model(TINY, seed=0).eval()


@pytest.fixture(scope="module")
def text_model():
    """A tiny model with the LLaMA-2 vocab, for the text-level API."""
    return build_model(TINY.replace(vocab_size=32000), seed=0).eval()


# ------------------------------------------------------------------------------------ sampling
def test_sample_next_controls() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g) * 3
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), greedy)
    # top-k: every draw is among the k best
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        s = sample_next(logits, 2.0, top_k=3, generator=g)
        assert (top3 == s[:, None]).any(-1).all()
    # top-p: every draw is inside the nucleus (smallest prefix of the sorted probs reaching p)
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    n_keep = (probs.cumsum(-1) < 0.6).sum(-1) + 1
    for _ in range(50):
        s = sample_next(logits, 1.0, top_p=0.6, generator=g)
        rank = (order == s[:, None]).float().argmax(-1)
        assert (rank < n_keep).all()
    # seeded: reproducible
    a = [sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    for bad in ({"temperature": -1.0}, {"temperature": 1.0, "top_k": 0}, {"temperature": 1.0, "top_p": 0.0}):
        with pytest.raises(ValueError):
            sample_next(logits, **bad)


def test_exponential_race_draws_in_proportion() -> None:
    """argmax(p / E), E ~ Exp(1): each token wins with its probability (20,000 draws, 4 sigma)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 20_000
    noise = draw_noise(n, 5, torch.device("cpu"), torch.Generator().manual_seed(0))
    drawn = pick(probs.log().expand(n, 5), 1.0, None, None, noise)
    freq = torch.bincount(drawn, minlength=5).double() / n
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert freq[4] == 0  # a zero-probability token is never drawn
    assert ((freq - probs.double()).abs() <= 4 * sigma + 1e-12).all(), freq


# ------------------------------------------------------------------------------ cache / padding
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "left-padded"])
def test_kv_cache_equals_recompute(tiny, prompts) -> None:
    """Same greedy tokens, and the logits of every step agree to 1e-5."""
    n = 12
    out = generate_tokens(tiny, prompts, n, kv_cache=True)
    assert out == generate_tokens(tiny, prompts, n, kv_cache=False)
    assert all(len(o) == n for o in out)
    # re-run the steps by hand on the generated tokens, comparing the two paths' logits
    L = max(map(len, prompts))
    padded = [[0] * (L - len(p)) + p for p in prompts]
    full = [p + o for p, o in zip(padded, out)]
    tokens, positions, key_mask = left_pad([f[L - len(p):] for f, p in zip(full, prompts)], L + n, 0, "cpu")
    with torch.inference_mode():
        tiny.setup_cache(len(prompts), L + n)
        try:
            for end in range(L, L + n):
                cached = step_logits(tiny, tokens, positions, key_mask, 0 if end == L else end - 1, end, True)
                recomputed = step_logits(tiny, tokens, positions, key_mask, 0, end, False)
                torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
        finally:
            tiny.clear_cache()


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_rows_equal_single_prompts(tiny, kv_cache: bool, num_beams: int) -> None:
    batch = generate_tokens(tiny, PROMPTS, 10, kv_cache=kv_cache, num_beams=num_beams)
    alone = [generate_tokens(tiny, [p], 10, kv_cache=kv_cache, num_beams=num_beams)[0] for p in PROMPTS]
    assert batch == alone


def test_stop_ids_end_rows_and_others_continue(tiny) -> None:
    free = generate_tokens(tiny, PROMPTS, 10)
    stop = free[0][3]  # row 0 emits this at step 3 (maybe earlier too)
    cut = [o[:o.index(stop) + 1] if stop in o else o for o in free]
    got = generate_tokens(tiny, PROMPTS, 10, stop_ids=[stop], pad_id=0)
    assert got == cut and len(got[0]) <= 4
    assert any(len(o) == 10 for o in got)  # rows that never hit it ran on unchanged


def test_mode_restored_and_cache_freed(tiny) -> None:
    tiny.train()
    generate_tokens(tiny, PROMPTS, 3)
    assert tiny.training and all(c is None for c in tiny.caches())
    tiny.eval()
    generate_tokens(tiny, PROMPTS, 3, num_beams=2)
    assert not tiny.training and all(c is None for c in tiny.caches())


def test_argument_errors(tiny) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_tokens(tiny, [[1], []], 3)
    with pytest.raises(ValueError, match="prompt 0 holds token id 256"):
        generate_tokens(tiny, [[256]], 3)
    with pytest.raises(ValueError, match="beam search"):
        generate_tokens(tiny, [[1]], 3, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_tokens(tiny, [[1]], TINY.max_seq_len)
    assert generate_tokens(tiny, [[1], [2]], 0) == [[], []]


# ------------------------------------------------------------------------------- beam search
def test_one_beam_is_greedy(tiny) -> None:
    for kv in (True, False):
        assert generate_tokens(tiny, PROMPTS, 10, num_beams=1, kv_cache=kv) == generate_tokens(tiny, PROMPTS, 10)


def hf_pair(vocab: int = 64, seed: int = 0):
    """A random HF LlamaForCausalLM (peaky: init std 0.3) and the same weights in our model."""
    transformers = pytest.importorskip("transformers")
    cfg = TINY.replace(vocab_size=vocab)
    torch.manual_seed(seed)
    kw = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, initializer_range=0.3)).eval()
    sd = {}
    for k, v in hf.state_dict().items():
        name = rename(k, HF_TO_CANONICAL)
        if name.endswith("attention.wq.weight"):
            v = hf_rows_to_meta(v, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            v = hf_rows_to_meta(v, cfg.n_kv_heads)
        sd[name] = v
    return hf, build_model(cfg, sd).eval()


# (seed, length_penalty, number of EOS ids, new tokens). The last two are cases where HF's early
# stop (no running beam can beat the worst finished one at the current length) changes the answer.
BEAM_CASES = {"lp1-2eos": (0, 1.0, 2, 12), "lp0": (0, 0.0, 1, 12), "lp-1-2eos": (0, -1.0, 2, 12),
              "lp1-8eos-early-stop": (2, 1.0, 8, 12), "lp4-8eos-early-stop": (2, 4.0, 8, 12)}


@pytest.mark.parametrize("case", sorted(BEAM_CASES))
def test_beam_search_matches_hf(case: str) -> None:
    seed, length_penalty, n_eos, n_new = BEAM_CASES[case]
    hf, ours = hf_pair(seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 6, 9, 4, 7, 5, 2, 8)]
    # EOS: the tokens seen most in the first steps of unconstrained beams, so that beams finish early
    free = generate_tokens(ours, prompts, n_new, num_beams=4)
    eos = [t for t, _ in Counter(t for o in free for t in o[1:6]).most_common(n_eos)]
    want = []
    for p in prompts:
        seq = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          num_beams=4, do_sample=False, max_new_tokens=n_new, eos_token_id=eos,
                          pad_token_id=0, length_penalty=length_penalty)[0, len(p):].tolist()
        end = next((k for k, t in enumerate(seq) if t in eos), None)
        want.append(seq if end is None else seq[:end + 1])  # HF pads after EOS
    assert any(len(w) < n_new for w in want)  # the comparison covers hypotheses that ended in EOS
    for kv in (True, False):
        got = generate_tokens(ours, prompts, n_new, num_beams=4, length_penalty=length_penalty,
                              stop_ids=eos, pad_id=0, kv_cache=kv)
        assert got == want, kv


# ------------------------------------------------------------------------------------ text API
def test_generate_text_sampling(text_model, llama2_sp) -> None:
    prompts = ["Give three tips for staying healthy.", "What is the capital of France?"]
    greedy = generate(text_model, llama2_sp, prompts, max_new_tokens=8)
    assert len(greedy) == 2 and all(isinstance(t, str) for t in greedy)
    assert generate(text_model, llama2_sp, prompts, max_new_tokens=8, kv_cache=False) == greedy
    assert generate(text_model, llama2_sp, prompts, max_new_tokens=8, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(text_model, llama2_sp, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=3) == greedy
    a = generate(text_model, llama2_sp, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    assert a == generate(text_model, llama2_sp, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    assert a != generate(text_model, llama2_sp, prompts, max_new_tokens=8, temperature=1.0, seed=2)
    assert generate(text_model, llama2_sp, prompts[0], max_new_tokens=8) == greedy[:1]


def test_stop_strings_trimmed(text_model, llama2_sp) -> None:
    prompt = "Give three tips for staying healthy."
    ids = encode_prompt(llama2_sp, prompt)
    full_ids = generate_tokens(text_model, [ids], 16)[0]
    full = llama2_sp.decode(full_ids)
    assert generate(text_model, llama2_sp, prompt, max_new_tokens=16) == [full]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    got = generate(text_model, llama2_sp, prompt, max_new_tokens=16, stop=[stop, "never-appears"])
    assert got == [full[:full.find(stop)]]
    # and generation stopped there: fewer tokens were produced
    seen: list[int] = []

    def stop_fn(row: int, toks: list[int]) -> bool:
        seen.append(len(toks))
        return stop in llama2_sp.decode(toks)

    assert len(generate_tokens(text_model, [ids], 16, stop_fn=stop_fn)[0]) == max(seen) < 16


def test_chat_prompt_has_one_bos(llama2_sp) -> None:
    ids = encode_prompt(llama2_sp, "Hi", chat=True)
    assert ids[:1] == [1] and ids.count(1) == 1
    assert llama2_sp.decode(ids, skip_special=False) == "<s>[INST] Hi [/INST]"
    assert encode_prompt(llama2_sp, "Hi") == [1, 6324]


@pytest.mark.slow
def test_smollm2_chat_answer(smollm2_gguf) -> None:
    from solotune.api import load

    model, tok = load(smollm2_gguf)
    q = "What is the capital of France?"
    out = generate(model, tok, q, chat=True, max_new_tokens=12)
    assert "Paris" in out[0]
    assert generate(model, tok, q, chat=True, max_new_tokens=12, kv_cache=False) == out
    assert generate(model, tok, [q, "Hi"], chat=True, max_new_tokens=12)[0] == out[0]  # left-padded batch


# --------------------------------------------------------------------------- static cache / compile
def test_static_cache_tensor_slot_equals_int_slot() -> None:
    """Writing at a tensor slot (index_copy_) and at an int slot (slicing) store the same; the decode
    mask at a tensor slot hides every later slot and the padding, whatever the buffers hold there."""
    k = torch.randn(2, 2, 3, 4)
    a, b = KVCache(2, 10, 2, 4, torch.float32, "cpu"), KVCache(2, 10, 2, 4, torch.float32, "cpu")
    a.write(4, k, -k)
    b.write(torch.tensor(4), k, -k)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.k[:, :, 4:7], k)
    key_mask = torch.tensor([[True] * 10, [False] * 2 + [True] * 8])
    m = generation_mask(2, 1, torch.tensor(5), key_mask, 10, torch.device("cpu"))
    assert m.shape == (2, 1, 1, 10)
    assert m[0, 0, 0].tolist() == [True] * 6 + [False] * 4
    assert m[1, 0, 0].tolist() == [False] * 2 + [True] * 4 + [False] * 4


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the captures."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_equals_eager_one_graph(tiny, fresh_dynamo) -> None:
    """fullgraph capture of the decode step: the same tokens as eager (greedy and seeded sampling,
    left-padded batch), one graph per sampling setting for every token, and a later call with other
    prompts (same batch and cache bucket) reuses the kept cache and the graph."""
    backend = CountingBackend()
    dec = Decoder(tiny, compile=True, backend=backend)
    assert generate_tokens(dec, PROMPTS, 12) == generate_tokens(tiny, PROMPTS, 12)
    assert backend.graphs == 1
    other = [[2, 4], [1, 9, 9, 9, 9, 9, 9, 9], [3], [5, 6, 7]]
    assert generate_tokens(dec, other, 9) == generate_tokens(tiny, other, 9)
    assert backend.graphs == 1 and all(c is None for c in tiny.caches())  # the decoder keeps its own
    kw = {"temperature": 0.9, "top_k": 50, "top_p": 0.9}
    sampled = generate_tokens(dec, PROMPTS, 12, seed=5, **kw)
    assert sampled == generate_tokens(tiny, PROMPTS, 12, seed=5, **kw)
    assert sampled != generate_tokens(dec, PROMPTS, 12, seed=6, **kw)
    assert backend.graphs == 2
    dec.release()


@pytest.mark.parametrize("tied_gqa3", [False, True], ids=["tiny", "tied-gqa3"])
def test_aot_compiled_matches_eager(tiny, fresh_dynamo, tied_gqa3: bool) -> None:
    """Through AOTAutograd too (functionalised in-place cache writes: what Inductor receives); also a
    SmolLM2-like layout (tied embeddings, 3 query heads per KV head)."""
    model = tiny
    if tied_gqa3:
        model = build_model(TINY.replace(n_heads=6, n_kv_heads=2, dim=96, tie_embeddings=True), seed=1).eval()
    dec = Decoder(model, compile=True, backend="aot_eager")
    assert generate_tokens(dec, PROMPTS, 8) == generate_tokens(model, PROMPTS, 8) == \
        generate_tokens(model, PROMPTS, 8, kv_cache=False)


def test_chunked_stop_checks_equal_per_token(tiny) -> None:
    """Checking stops every 5 tokens ends each row where checking every token does."""
    free = generate_tokens(tiny, PROMPTS, 14)
    stop = [free[0][3], free[2][6]]
    seen: list[tuple[int, int]] = []

    def stop_fn(row: int, toks: list[int]) -> bool:
        seen.append((row, len(toks)))
        return row == 1 and len(toks) == 7

    for chunk in (1, 5):
        dec = Decoder(tiny, check_every=chunk)
        seen.clear()
        got = generate_tokens(dec, PROMPTS, 14, stop_ids=stop, stop_fn=stop_fn)
        if chunk == 1:
            want, want_seen = got, list(seen)
        assert got == want and sorted(seen) == sorted(want_seen)  # the same calls, row by row per chunk
    assert len(want[1]) == 7 and any(len(o) < 14 for o in want)


def test_cli_compile_flag() -> None:
    from solotune.cli import build_parser

    base = ["generate", "--model", "m", "--prompt", "p"]
    assert build_parser().parse_args(base).compile is None  # auto: on for CUDA where it pays
    assert build_parser().parse_args(base + ["--compile"]).compile is True
    assert build_parser().parse_args(base + ["--no-compile"]).compile is False
