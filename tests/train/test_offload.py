"""Activation offload (solotune/train/offload.py): offload == no offload, bit for bit.

CPU: the "host" is separate CPU pieces, so selection, dedup of shared storages, views,
retiring and prefetch all run here. Gradients of every trainable parameter are compared with
``torch.equal`` (fp32 and fp64, LoRA and full fine-tuning, checkpointing all / every:2 / off), the
bytes moved are compared with what the anatomy instrument calls activations, and the checkpointed
blocks are shown to offload their inputs only. GPU tests (marked ``gpu``): bf16 equality and peak
memory with offload below the peak without, by a margin derived from the shapes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref

import pytest
import torch

from solotune.bench.anatomy import AnatomyInstrument, TensorMeter
from solotune.config import ModelConfig
from solotune.data import IGNORE_INDEX, Example
from solotune.data.batch import Batch, collate_batch, positions_for
from solotune.model import build_model
from solotune.peft.lora import apply_lora, lora_parameters
from solotune.train.loss import full_logits_loss
from solotune.train.offload import OFFLOAD_KINDS, ActivationOffload, _Saved, host_piece_sizes, offload_context

CFG = ModelConfig(name="tiny-offload", dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64,
                  hidden_dim=64, max_seq_len=64)
LENGTHS = (9, 14, 6)  # B = 3 rows, T = 14 (right-padded)

def _examples(lengths=LENGTHS, seed=0, vocab=CFG.vocab_size):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    return out


def _batch(device="cpu", lengths=LENGTHS) -> Batch:
    return collate_batch(_examples(lengths), pad_id=0).to(device)


def _packed_batch() -> Batch:
    """All examples back to back in one row (block-diagonal mask saved by every checkpoint)."""
    ex = _examples()
    T = sum(LENGTHS) + 3
    ids = torch.zeros(1, T, dtype=torch.long)
    labels = torch.full((1, T), IGNORE_INDEX, dtype=torch.long)
    start = 0
    for e in ex:
        n = len(e.input_ids)
        ids[0, start:start + n] = torch.tensor(e.input_ids)
        labels[0, start:start + n] = torch.tensor([IGNORE_INDEX] + e.labels[1:])
        start += n
    seq_lens = (LENGTHS,)
    return Batch(ids, labels, positions_for(seq_lens, T), seq_lens)


def _model(method: str, ckpt: str, dtype=torch.float32, cfg=CFG, device="cpu", seed=0, dropout=0.1):
    model = build_model(cfg, dtype=dtype, device=device, seed=seed)
    if method == "lora":
        apply_lora(model, ("wq", "wv", "w2"), rank=4, alpha=8, dropout=dropout,
                   generator=torch.Generator(device=device).manual_seed(1))
        with torch.no_grad():  # B = 0 would make every A gradient zero: equal for free
            g = torch.Generator(device=device).manual_seed(2)
            for p in lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.1)
    model.train()
    model.set_grad_checkpointing(ckpt)
    return model


def _run(model, batch, ctx=None, *, backward_inside=True, autocast=None):
    """Forward + backward of one micro-batch under ``ctx``; (loss, {name: grad}) of trainable params."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # LoRA dropout: both runs draw the same masks
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    cast = torch.autocast(batch.input_ids.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        with cast:
            loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(ref, got):
    (loss_a, grads_a), (loss_b, grads_b) = ref, got
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


def _assert_balanced(stats):
    """Every offloaded byte came back exactly once (copied, or reused in place), none leaked."""
    assert stats.offloaded > 0 and stats.offloaded_bytes > 0
    assert stats.reloaded_bytes + stats.reused_bytes == stats.offloaded_bytes
    gc.collect()
    assert stats.host_bytes == 0 and stats.host_peak_bytes > 0


# ------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("ckpt", ["all", "every:2", "off"])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_without_offload(dtype, method, ckpt):
    model = _model(method, ckpt, dtype)
    batch = _batch()
    ref = _run(model, batch)
    off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=1)
    _assert_same(ref, _run(model, batch, off))
    _assert_balanced(off.stats)
    assert off.stats.reloaded_bytes > off.stats.reused_bytes  # most came back through the host copies
    # a second window with the same context: still equal, stats add up
    _assert_same(ref, _run(model, batch, off))
    assert off.stats.windows == 2
    _assert_balanced(off.stats)


@pytest.mark.parametrize("nbytes", [0, 1, 511, 512, 513, 4096, 3 * 4096 + 1000, 5 * 65536, 5 * 65536 + 6 * 1024 + 2])
def test_host_pieces_are_powers_of_two_that_hold_the_bytes(nbytes):
    largest = 65536
    sizes = host_piece_sizes(nbytes, largest)
    assert all(k & (k - 1) == 0 and 512 <= k <= largest for k in sizes)
    assert nbytes <= sum(sizes) < nbytes + 512  # never the caching allocator's round-up to 2x
    assert len(sizes) <= nbytes // largest + (largest // 512).bit_length()
    assert sizes == sorted(sizes, reverse=True)


def test_host_piece_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        host_piece_sizes(10, 3 * 1024)
    with pytest.raises(ValueError, match="power of two"):
        ActivationOffload(_model("lora", "all"), "cpu", host_piece_bytes=256)


def test_gradients_equal_with_host_copies_in_many_pieces():
    """Pieces of 512 bytes: every storage's host copy is split (offsets and the partial last piece)."""
    model = _model("full", "all")
    batch = _batch()
    off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=1, host_piece_bytes=512)
    _assert_same(_run(model, batch), _run(model, batch, off))
    _assert_balanced(off.stats)
    assert off.stats.offloaded_bytes > 4 * 512 * off.stats.offloaded  # most storages span several pieces


def test_host_memory_running_out_is_an_out_of_memory_error(monkeypatch):
    """cudaHostAlloc failing (page-locked RAM exhausted) surfaces as torch.OutOfMemoryError naming the
    host, which the loop turns into its one line; other errors pass through unchanged."""
    import solotune.train.offload as offload_mod

    model = _model("lora", "all")
    batch = _batch()
    cases = (("CUDA error: out of memory", torch.OutOfMemoryError), ("CUDA error: unknown", RuntimeError))
    for message, expected in cases:
        def fail(nbytes, pin, message=message):
            raise RuntimeError(message)

        monkeypatch.setattr(offload_mod, "_host_empty", fail)
        with pytest.raises(expected) as info:
            _run(model, batch, ActivationOffload(model, "cpu", min_bytes=1))
        assert ("pinned host memory: could not lock" in str(info.value)) == (expected is torch.OutOfMemoryError)


def test_offload_stops_before_locking_more_than_the_host_has(monkeypatch):
    """Locking past the host's available RAM (less a reserve) is refused as an out-of-memory error before
    the kernel's OOM killer could end the run silently; a later window reuses what the first held, unchecked."""
    import solotune.train.offload as offload_mod

    model = _model("lora", "all")
    batch = _batch()
    off = ActivationOffload(model, "cpu", min_bytes=1)
    _run(model, batch, off)  # the first window: the host copies' peak
    held = off.stats.host_peak_bytes
    monkeypatch.setattr(offload_mod, "_available_host_bytes", lambda: offload_mod.HOST_RESERVE_BYTES + 1)
    _run(model, batch, off)  # within the earlier peak: no new RAM asked for, no check
    with pytest.raises(torch.OutOfMemoryError, match=r"pinned host memory: could not lock .* GiB available"):
        _run(model, _batch(lengths=(30, 30, 30)), off)  # longer rows: more than the host has
    assert off.stats.host_peak_bytes >= held
    assert offload_mod._available_host_bytes() == offload_mod.HOST_RESERVE_BYTES + 1
    monkeypatch.undo()
    assert offload_mod._available_host_bytes() is None or offload_mod._available_host_bytes() > 0


def test_packed_rows_document_mask_offloaded_once():
    model = _model("lora", "all")
    batch = _packed_batch()
    assert batch.packed
    off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=0)
    _assert_same(_run(model, batch), _run(model, batch, off))
    _assert_balanced(off.stats)


def test_backward_outside_the_context():
    """Forward inside, backward after exit: exit retires the pending copies, all come back from the host."""
    model = _model("full", "every:2")
    batch = _batch()
    off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=3)
    _assert_same(_run(model, batch), _run(model, batch, off, backward_inside=False))
    _assert_balanced(off.stats)
    assert off.stats.reused_bytes == 0


def test_autocast_bf16_on_cpu_equal_and_weight_copies_stay():
    """Under autocast the saved tensors are bf16 activations and bf16 weight copies; the copies are
    not activations (the anatomy's rule) and stay on the device."""
    model = _model("lora", "every:2")
    batch = _batch()
    plain = AnatomyInstrument(model, TensorMeter())
    with plain.forward_context():
        ref = _run(model, batch, autocast=torch.bfloat16)
    plain.close()
    anat = AnatomyInstrument(model, TensorMeter())
    off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=1)
    with anat.forward_context():
        got = _run(model, batch, off, autocast=torch.bfloat16)
    anat.close()
    _assert_same(ref, got)
    _assert_balanced(off.stats)
    assert plain.records[-1].weight_copies > 0
    assert anat.records[-1].weight_copies == plain.records[-1].weight_copies


def test_a_one_ulp_error_in_a_copy_is_caught():
    """The equality tests can fail: nudging one restored element by one ulp changes the gradients."""

    class OneUlpOff(ActivationOffload):
        def _unpack(self, packed):
            out = super()._unpack(packed)
            if isinstance(packed, _Saved) and out.is_floating_point() and out.numel():
                out = out.clone()
                flat = out.view(-1)
                flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=out.dtype))
            return out

    model = _model("lora", "all")
    batch = _batch()
    ref = _run(model, batch)
    _, grads = _run(model, batch, OneUlpOff(model, "cpu", min_bytes=1, max_in_flight=0))
    assert any(not torch.equal(ref[1][n], grads[n]) for n in grads)


# ------------------------------------------------------------------------- what moves
def test_checkpointed_blocks_offload_their_input_only():
    """Two more checkpointed blocks = two more hidden states [B, T, C] moved, nothing else: the
    blocks' internals stay behind checkpoint's own hooks and the RoPE cos/sin (shared by every
    block) move once. Without checkpointing each block moves many storages."""
    B, T = len(LENGTHS), max(LENGTHS)
    moved = {}
    for ckpt in ("all", "off"):
        for L in (2, 4):
            cfg = ModelConfig(**{**CFG.__dict__, "n_layers": L})
            model = _model("lora", ckpt, cfg=cfg)
            off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=0)
            _run(model, _batch(), off)
            moved[ckpt, L] = off.stats
    hidden = B * T * CFG.dim * 4  # fp32
    assert moved["all", 4].offloaded - moved["all", 2].offloaded == 2
    assert moved["all", 4].offloaded_bytes - moved["all", 2].offloaded_bytes == 2 * hidden
    assert moved["off", 4].offloaded - moved["off", 2].offloaded > 2 * 4  # internals move too


@pytest.mark.parametrize("ckpt", ["all", "every:2", "off"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bytes_moved_are_the_anatomy_activations(method, ckpt):
    """Without offload the anatomy counts A bytes of saved activations. With offload inside the
    anatomy's hooks: offloaded + kept == A, and the anatomy sees only the kept ones, each below
    min_bytes (the saved bytes left on the device). Parameters never move (they are not in A)."""
    min_bytes = 2048
    model = _model(method, ckpt)
    batch = _batch()
    plain = AnatomyInstrument(model, TensorMeter())
    with plain.forward_context():
        ref = _run(model, batch)
    plain.close()
    anat = AnatomyInstrument(model, TensorMeter())
    off = ActivationOffload(model, "cpu", min_bytes=min_bytes, max_in_flight=1)
    with anat.forward_context():
        got = _run(model, batch, off)
    anat.close()
    _assert_same(ref, got)
    acts = plain.records[-1].activations
    assert off.stats.offloaded_bytes + off.stats.kept_bytes == acts
    assert off.stats.kept > 0 and off.stats.offloaded_bytes > acts // 2
    assert anat.records[-1].activations == off.stats.kept_bytes <= off.stats.kept * (min_bytes - 1)


@pytest.mark.parametrize("max_in_flight", [0, 2])
def test_offloaded_storages_are_released_after_the_forward(max_in_flight):
    """The checkpointed blocks' input storages die once copied (at most ``max_in_flight`` pending);
    without offload the graph keeps all of them."""
    model = _model("lora", "all")
    batch = _batch()
    alive = {}
    for name, ctx in (("none", None), ("off", ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=max_in_flight))):
        refs = []
        hooks = [layer.register_forward_pre_hook(
            lambda m, args: refs.append(weakref.ref(args[0].untyped_storage())) if torch.is_grad_enabled() else None)
            for layer in model.layers]
        model.zero_grad(set_to_none=True)
        with ctx if ctx is not None else contextlib.nullcontext():
            loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
            gc.collect()
            alive[name] = sum(r() is not None for r in refs[:len(model.layers)])
            loss.backward()
        for h in hooks:
            h.remove()
    assert alive["none"] == len(model.layers)
    assert alive["off"] <= max_in_flight


def test_prefetch_brings_back_the_previous_block_input():
    model = _model("lora", "all")
    off = ActivationOffload(model, "cpu", min_bytes=1, max_in_flight=0)
    _assert_same(_run(model, _batch()), _run(model, _batch(), off))
    assert off.stats.prefetched >= len(model.layers) - 1  # h_{i-1} while block i recomputes


def test_offload_context_kinds():
    model = _model("lora", "all")
    assert OFFLOAD_KINDS == ("none", "activations")
    assert isinstance(offload_context("none", model, "cpu"), contextlib.nullcontext)
    ctx = offload_context("activations", model, "cpu", min_bytes=7)
    assert isinstance(ctx, ActivationOffload) and ctx.min_bytes == 7
    with pytest.raises(ValueError, match="offload 'disk'"):
        offload_context("disk", model, "cpu")
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()
    with pytest.raises(ValueError):
        ActivationOffload(model, "cpu", max_in_flight=-1)


# ---------------------------------------------------------------------------------- GPU
@pytest.fixture
def deterministic():
    """Bitwise comparisons on CUDA need run-to-run reproducible kernels: math attention (no atomics)
    and torch's deterministic algorithms (embedding backward without atomicAdd)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


@pytest.mark.parametrize("ckpt", ["all", "every:2"])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("precision", ["bf16", "bf16-amp"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gradients_equal_without_offload(deterministic, precision, method, ckpt):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.bfloat16 if precision == "bf16-amp" else None
    model = _model(method, ckpt, dtype, device="cuda", dropout=0.0)
    batch = _batch("cuda", lengths=(40, 64, 17))
    ref = _run(model, batch, autocast=autocast)
    again = _run(model, batch, autocast=autocast)
    assert all(torch.equal(ref[1][n], again[1][n]) for n in ref[1]), "reference not reproducible on this GPU"
    off = ActivationOffload(model, "cuda", min_bytes=1, max_in_flight=1)
    _assert_same(ref, _run(model, batch, off, autocast=autocast))
    torch.cuda.synchronize()
    _assert_balanced(off.stats)
    assert off.stats.prefetched > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pinned_host_bytes_are_the_offloaded_bytes_not_the_next_power_of_two():
    """A 48 MiB + 4 KiB activation: one pinned buffer would be rounded up to 64 MiB by torch's
    caching host allocator; the pieces lock its size (grown by at most the size, if nothing cached)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or "allocated_bytes.current" not in stats():
        pytest.skip("this torch has no pinned-allocator statistics")
    n = 3 * 2**24 + 4096
    w = torch.ones(n // 4, device="cuda", requires_grad=True)
    x = torch.randn(n // 4, device="cuda")  # fp32: n bytes, saved by the product for w's gradient
    before = stats()["allocated_bytes.current"]
    off = ActivationOffload(torch.nn.Linear(1, 1), "cuda", max_in_flight=0)
    with off:
        (w * x).sum().backward()
    torch.cuda.synchronize()
    assert off.stats.offloaded_bytes == n and off.stats.host_peak_bytes == n
    assert stats()["allocated_bytes.current"] - before <= n
    assert torch.equal(w.grad, x)


LONG_THIN = (32, 1, 16384, 256)  # layers, rows, tokens per row, width: long rows, many thin layers


def _long_thin_lora() -> tuple[torch.nn.Module, Batch]:
    """A bf16 LoRA model (checkpointing all, no dropout) on CUDA and one random row of it."""
    L, B, T, C = LONG_THIN
    cfg = ModelConfig(name="long-thin", dim=C, n_layers=L, n_heads=4, n_kv_heads=4, vocab_size=128,
                      hidden_dim=C, max_seq_len=T)
    model = _model("lora", "all", torch.bfloat16, cfg=cfg, device="cuda", dropout=0.0)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    return model, Batch(ids, ids.clone(), torch.arange(T).expand(B, T).clone(), ((T,),) * B).to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_lowers_peak_memory_by_the_block_inputs():
    """Long rows, many thin layers, checkpointing all, bf16 LoRA. Without offload the graph holds
    every block input h (B*T*C*2 bytes) from the end of the forward into the backward; with it, at
    most ``max_in_flight`` pending copies plus the block in use and one prefetch, each at most 2h
    (RMSNorm's fp32 input is the largest saved storage: the vocabulary is kept small so the fp32
    logits are <= h). The per-block transients are the same in both runs, so
    peak_none - peak_off >= (L - 2 (max_in_flight + 2)) h."""
    L, B, T, C = LONG_THIN
    model, batch = _long_thin_lora()
    h = B * T * C * 2
    max_in_flight = 2
    peaks, mids, results = {}, {}, {}
    for name in ("warm-up", "none", "off"):  # warm-up: cuBLAS workspaces are not charged to "none"
        ctx = ActivationOffload(model, "cuda", max_in_flight=max_in_flight) if name == "off" else contextlib.nullcontext()
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with ctx:
            loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
            mids[name] = torch.cuda.memory_allocated() - base
            loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        results[name] = loss.detach(), [p.grad.clone() for p in lora_parameters(model)]
        del loss
    assert mids["none"] >= L * h  # the test measures what it claims: all block inputs held
    assert mids["off"] <= mids["none"] - (L - 2 * (max_in_flight + 1)) * h
    assert peaks["none"] - peaks["off"] >= (L - 2 * (max_in_flight + 2)) * h, (peaks, h)
    assert torch.equal(results["none"][0], results["off"][0])  # the forward is deterministic
    # Gradient equality is test_cuda_gradients_equal_without_offload's (deterministic kernels, bitwise).
    # Here, with flash attention and cuBLAS heuristics at T=16384, the offloaded run's LoRA gradients
    # were seen to differ from the plain run's by a few bf16 ulps amplified over 32 layers while two
    # plain runs agreed bitwise (H200, 2026-12-01) — open, see benchmarks/NOTES.md; not asserted here.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_long_rows_offload_is_as_close_to_fp32_as_the_plain_run():
    """The open long-row question (benchmarks/NOTES.md): with flash attention at T = 16,384 the
    offloaded bf16 run's LoRA gradients differ from the plain bf16 run's. Rounding (another kernel
    choice) or wrong data? Against fp32 gradients of the same weights, an offload that restores the
    right bytes is as close as the plain run (within 2x its error); wrong bytes in a block input would
    be off by far more. (Not bitwise between runs, offloaded or not: flash attention's backward adds
    dQ with atomics, in whatever order the blocks finish — the first GPU run of this test showed two
    offloaded runs differing so, which is what the first long-row comparison had seen.)"""
    model, batch = _long_thin_lora()
    plain = _run(model, batch)
    off = [_run(model, batch, ActivationOffload(model, "cuda", max_in_flight=2)) for _ in range(2)]
    assert torch.equal(off[0][0], off[1][0])  # the forward (the loss) is deterministic
    ref = _run(model.float(), batch)[1]  # the same values in fp32 (bf16 -> fp32 is exact)

    def rel_err(grads: dict) -> float:
        num = sum(float((grads[n].float() - ref[n]).norm() ** 2) for n in ref)
        den = sum(float(ref[n].norm() ** 2) for n in ref)
        return (num / den) ** 0.5

    e_plain, e_off, e_off2 = rel_err(plain[1]), rel_err(off[0][1]), rel_err(off[1][1])
    assert e_plain < 0.2, e_plain  # the fp32 reference is a meaningful one for this model
    assert max(e_off, e_off2) <= 2 * e_plain + 1e-6, (e_off, e_off2, e_plain)
