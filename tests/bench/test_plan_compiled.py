"""The planner's compiled blocks (``Setup(compiled=True)``, no checkpointing) against a compiled
training step measured by the anatomy on CPU: the dry run traces each block through AOTAutograd with
Inductor's decompositions, joint-graph passes and min-cut partitioner (``dryrun._AsCompiledBlock``),
so what it counts equals what the instrument's saved-tensor hooks see when the loop runs blocks
compiled by torch.compile, byte for byte."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.bench.anatomy import AnatomyInstrument, TensorMeter
from solotune.bench.cell import FoldedTokenizer
from solotune.bench.plan import Setup, format_plan, predict, saved_activations
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.tokenizer import load_tokenizer
from solotune.train import TrainConfig, finetune

GQA = ModelConfig(name="tiny-gqa", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                  max_seq_len=256)
MHA_TIED = ModelConfig(name="tiny-mha-tied", dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=200,
                       hidden_dim=128, tie_embeddings=True, max_seq_len=256)


def _measure(cfg: ModelConfig, precision: str, method: str, gc: str, mb: int, backend: str, tmp_path) -> list:
    """The anatomy's forward/backward records of a one-step run whose blocks are compiled with ``backend``."""
    model = build_model(cfg, seed=0, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    tc = TrainConfig(model=cfg.name, data="alpaca-sample", output_dir=str(tmp_path / "run"), max_steps=1,
                     max_samples=mb, batch_size=mb, grad_accum=1, precision=precision, full=method == "full",
                     lora_rank=8 if method == "lora" else 0, lora_alpha=16, lora_dropout=0.05, grad_checkpoint=gc,
                     max_seq_len=40, val_samples=0, generate_samples=False, progress=False, device="cpu",
                     log_every=10**9, packing="off", compile="off")  # the blocks are compiled here, with `backend`
    meter = TensorMeter()
    inst = AnatomyInstrument(model, meter)
    tok = FoldedTokenizer(load_tokenizer(BUNDLED_LLAMA2_TOKENIZER), cfg.vocab_size)
    torch._dynamo.reset()
    model.compile_blocks(backend=backend)  # dynamo traces each block at its first call: after the loop's LoRA
    # no meter.tracking(): dynamo does not compile under its dispatch mode, and only the instrument's
    # saved-tensor ledger (not the live bytes) is compared here
    with contextlib.redirect_stdout(io.StringIO()):
        finetune(tc, model=model, tokenizer=tok, instrument=inst)
    inst.close()
    return [r for r in inst.records if r.phase == "forward/backward"]


def _setup(cfg: ModelConfig, precision: str, method: str, shape: tuple[int, int], compiled: bool, **kw) -> Setup:
    # the loss is eager in these runs (the loop compiles it only when it compiles the blocks itself)
    return Setup(cfg, seq_len=shape[1], batch=shape[0], precision=precision, lora_rank=8 if method == "lora" else 0,
                 lora_dropout=0.05, device="cpu", compiled=compiled, loss_compiled=False, **kw)


# (model, precision, method): pure bf16 with LoRA dropout (its masks), fp32 full fine-tuning, GQA,
# a tied head under bf16 autocast (the compiled block's casts of the fp32 weights).
CASES = [(GQA, "bf16", "lora"), (GQA, "fp32", "full"), (MHA_TIED, "bf16-amp", "lora")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}")
def test_compiled_blocks_measured_equal_the_planner(case, tmp_path):
    """aot_eager_decomp_partition: Inductor's decompositions and min-cut partitioner with the graphs
    run as they are (no C++ compile: seconds). The real Inductor backend on CPU gives the same
    records for these cases (checked by hand: ~1 min a case, too slow for the suite)."""
    cfg, precision, method = case
    records = _measure(cfg, precision, method, "off", 2, "aot_eager_decomp_partition", tmp_path)
    assert records
    for r in records:
        acts, copies, *_ = saved_activations(_setup(cfg, precision, method, r.shape, compiled=True))
        assert (r.activations, r.weight_copies) == (acts, copies), r.shape
        eager, eager_copies, *_ = saved_activations(_setup(cfg, precision, method, r.shape, compiled=False))
        assert (eager, eager_copies) != (acts, copies)  # the eager model would not pass this test


def _clear_caches() -> None:
    from solotune.bench import dryrun

    dryrun.dry_run.cache_clear()
    dryrun._block_graph.cache_clear()


def test_a_block_that_cannot_be_traced_is_modelled_eager_with_a_note(monkeypatch):
    from solotune.bench import dryrun

    def fail(*args, **kwargs):
        raise RuntimeError("no trace here")

    shape = (2, 16)
    eager = predict(_setup(GQA, "bf16", "lora", shape, compiled=False))
    _clear_caches()
    with monkeypatch.context() as m:
        m.setattr(dryrun, "_trace_block", fail)
        try:
            p = predict(_setup(GQA, "bf16", "lora", shape, compiled=True))
        finally:
            _clear_caches()  # nothing of the failing runs stays cached
    assert p.activations == eager.activations and p.weight_copies == eager.weight_copies
    assert len(p.notes) == 1 and "no trace here" in p.notes[0] and "eager" in p.notes[0]
    assert p.to_dict()["notes"] == list(p.notes)
    assert "no trace here" in format_plan([(p, 1.0, True)], 2**40)  # `solotune plan` says so too
    assert not predict(_setup(GQA, "bf16", "lora", shape, compiled=True)).notes


def test_checkpointed_compiled_blocks_keep_their_inputs():
    """With checkpointing everywhere the compiled and eager blocks save the same (their inputs)."""
    shape = (2, 16)
    eager = predict(_setup(GQA, "bf16", "lora", shape, compiled=False, grad_checkpoint="all"))
    comp = predict(_setup(GQA, "bf16", "lora", shape, compiled=True, grad_checkpoint="all"))
    assert (comp.activations, comp.weight_copies) == (eager.activations, eager.weight_copies)
    assert comp.activations < predict(_setup(GQA, "bf16", "lora", shape, compiled=True)).activations


def test_7b_traces_two_graphs_and_saves_less_than_eager(monkeypatch):
    """A 32-layer 7B compiled plan traces one graph for block 0 (its input needs no gradient under
    LoRA) and one for every other block, once (the traced graphs are cached: the checkpointing
    policies' dry runs reuse them); the compiled blocks keep less than the eager ones (the partitioner recomputes the
    pointwise work and saves no fp32 copies of the normed inputs)."""
    from solotune.bench import dryrun
    from solotune.bench.plan import model_config

    traced = []
    real = dryrun._trace_block
    monkeypatch.setattr(dryrun, "_trace_block", lambda *a, **k: traced.append(1) or real(*a, **k))
    s = Setup(model_config("llama2-7b"), seq_len=512, batch=8, precision="bf16", lora_rank=16, lora_dropout=0.05,
              compiled=True)
    _clear_caches()
    comp = predict(s)
    assert len(traced) == 2 and not comp.notes
    for gc in ("all", "every:2", "every:4"):  # other dry runs, the same two block signatures
        assert not predict(s.replace(grad_checkpoint=gc)).notes
    assert len(traced) == 2
    eager = predict(s.replace(compiled=False))
    assert comp.activations < eager.activations and comp.peak < eager.peak
