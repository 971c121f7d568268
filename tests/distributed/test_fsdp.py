"""FSDP2 data parallelism on CPU: 2 processes, gloo, the tiny model, through the one training loop.

One module-scoped spawn runs every 2-rank scenario (a process group costs seconds to start); the
tests then compare what the ranks wrote against single-process runs of the same config:
(a) the loss curve, gradient norms, val loss and final/ weights equal the single-process run of the
same global batch (fp32 tolerance), LoRA and full; (b) checkpoints move between world sizes
(2 ranks -> 1 process, 2 -> 2 bit for bit with dropout, 1 -> 2); (c) only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from gloo_ranks import free_port, spawn_ranks  # noqa: E402
from train_fixtures import TINY, CtrlCAfter, WordTokenizer, tiny_config, tiny_model, write_records  # noqa: E402

from solotune.parallel.fsdp import NVLS_OFF  # noqa: E402
from solotune.train import finetune  # noqa: E402
from solotune.train.state import list_checkpoints, load_checkpoint  # noqa: E402

WORLD = 2
RTOL = 2e-6  # fp32: the ranks' sums of partial batches round differently from one big batch

# name -> TrainConfig overrides. "epochs": 31 examples in windows of 2 x 3 -> the last window holds
# one example, so rank 1's share of it is empty (a padding row with no target).
RUNS = {
    "lora": dict(max_steps=None, epochs=1, max_samples=31, batch_size=3, grad_accum=2, eval_every=2,
                 lora_targets=("wq", "wv", "w2")),
    "full": dict(full=True, lr=3e-3, max_steps=4, weight_decay=0.1, warmup_steps=1, grad_checkpoint="all"),
    # Low precision: bf16 bases + fp32 adapters in one FSDP group; fp16 with the sharded loss scaler.
    "bf16": dict(precision="bf16", max_steps=3, batch_size=4),
    "fp16-amp": dict(precision="fp16-amp", max_steps=3, batch_size=4),
    "nodrop": dict(max_steps=6, batch_size=4, lora_targets=("wq", "wk", "w1")),  # cut at 3 -> resumed on 1
    "drop": dict(max_steps=6, batch_size=4, lora_dropout=0.1),  # cut at 3 -> resumed on 2, bit for bit
    "tied": dict(full=True, lr=3e-3, max_steps=4),  # full FT, tied embeddings: cut at 2 -> resumed on 1
}
TIED = TINY.replace(tie_embeddings=True)
ODD = TINY.replace(vocab_size=129)  # the embedding's rows split 65 / 64 over the 2 ranks


class SigintOnRank:
    """Rank ``rank`` gets a real SIGINT after optimizer step ``n`` (the other rank does not)."""

    def __init__(self, rank: int, me: int, n: int) -> None:
        self.rank, self.me, self.n = rank, me, n

    def after_step(self, model, optimizer, step):
        if step == self.n and self.me == self.rank:
            os.kill(os.getpid(), signal.SIGINT)


class GradsAfterEachMicroBatch:
    """Records, after each micro-batch's backward, whether the sharded trainable parameters hold a
    gradient yet: FSDP writes it only when it reduce-scatters."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.seen = model, []

    @contextlib.contextmanager
    def forward_context(self):
        yield
        grads = [p.grad is not None for p in self.model.parameters() if p.requires_grad]
        self.seen.append(all(grads) if all(grads) or not any(grads) else None)  # None: mixed


def _cfg(root: Path, name: str, **kw):
    return tiny_config(root, root / "records.json", **{"output_dir": str(root / name), **RUNS.get(name, {}), **kw})



def _losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter.safetensors"))


# ================================================================================ the 2 ranks
def _scenarios(rank: int, root: Path) -> None:
    """Everything the 2 ranks run, in order (each rank runs the same code)."""
    from solotune.parallel.fsdp import FSDPContext
    from solotune.model import Transformer
    from solotune.peft import apply_lora

    tok = WordTokenizer()
    dist_kw = dict(distributed="fsdp")
    model = tiny_model()
    probe = GradsAfterEachMicroBatch(model)  # fully_shard wraps the model in place
    finetune(_cfg(root, "lora", **dist_kw), model=model, tokenizer=tok, instrument=probe)
    if rank == 0:
        (root / "grads-seen.json").write_text(json.dumps(probe.seen))
    for name in ("full", "bf16", "fp16-amp"):
        finetune(_cfg(root, name, **dist_kw), model=tiny_model(), tokenizer=tok)
    # A real Ctrl-C on rank 1 only: both ranks stop after the same step and write one checkpoint.
    try:
        finetune(_cfg(root, "nodrop", output_dir=str(root / "sigint"), **dist_kw), model=tiny_model(), tokenizer=tok,
                 instrument=SigintOnRank(1, rank, 2))
    except KeyboardInterrupt:
        (root / f"sigint-rank{rank}.txt").write_text("interrupted")
    # 2 ranks, cut after step 3 (checkpoint written by both ranks); the main process resumes it on 1.
    with contextlib.suppress(KeyboardInterrupt):
        finetune(_cfg(root, "nodrop", output_dir=str(root / "nodrop-cut2"), **dist_kw), model=tiny_model(),
                 tokenizer=tok, instrument=CtrlCAfter(3))
    with contextlib.suppress(KeyboardInterrupt):
        finetune(_cfg(root, "tied", output_dir=str(root / "tied-cut2"), **dist_kw), model=tiny_model(cfg=TIED),
                 tokenizer=tok, instrument=CtrlCAfter(2))
    # 2 ranks with dropout: straight, and cut + resumed on the same 2 ranks.
    finetune(_cfg(root, "drop", output_dir=str(root / "drop-straight2"), **dist_kw), model=tiny_model(), tokenizer=tok)
    cut = _cfg(root, "drop", output_dir=str(root / "drop-cut2"), **dist_kw)
    with contextlib.suppress(KeyboardInterrupt):
        finetune(cut, model=tiny_model(), tokenizer=tok, instrument=CtrlCAfter(3))
    finetune(cut.replace(resume=cut.output_dir), model=tiny_model(), tokenizer=tok)
    # A single-process checkpoint (written by the main process before the spawn) resumed on 2 ranks.
    one = _cfg(root, "nodrop", output_dir=str(root / "nodrop-cut1"))
    finetune(one.replace(resume=one.output_dir, output_dir=str(root / "nodrop-1to2"), **dist_kw),
             model=tiny_model(), tokenizer=tok)
    # Random init on the meta device, materialised shard by shard == build_model(seed) + apply_lora.
    with FSDPContext(torch.device("cpu")) as par:
        with torch.device("meta"):
            meta = Transformer(ODD)
        apply_lora(meta, ("wq", "wv"), 4, 8, 0.0)
        cfg = _cfg(root, "lora", seed=7)
        sharded = par.wrap(meta, cfg, policy=_policy("fp32"))
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sharded.state_dict().items()}
        if rank == 0:
            torch.save(full, root / "meta-init.pt")


def _policy(name: str):
    from solotune.train.precision import get_policy

    return get_policy(name)



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Run every 2-rank scenario once; returns the folder the runs wrote."""
    root = tmp_path_factory.mktemp("fsdp")
    write_records(root / "records.json")
    torch.set_num_threads(1)
    with contextlib.suppress(KeyboardInterrupt):  # the single-process checkpoint the ranks resume
        finetune(_cfg(root, "nodrop", output_dir=str(root / "nodrop-cut1")), model=tiny_model(),
                 tokenizer=WordTokenizer(), instrument=CtrlCAfter(3))
    spawn_ranks(_scenarios, WORLD, root)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================================ (a) parity
@pytest.mark.parametrize("name", ["lora", "full"])
def test_two_ranks_follow_the_single_process_curve(ranks, tmp_path, name):
    one = finetune(_cfg(ranks, name, output_dir=str(tmp_path / "one")), model=tiny_model(), tokenizer=WordTokenizer())
    two = ranks / name
    assert one.steps == len(_losses(two)) == (6 if name == "lora" else 4)
    for key in ("loss", "grad_norm", "tokens", "target_tokens"):
        assert _losses(two, key) == pytest.approx(_losses(tmp_path / "one", key), rel=RTOL, abs=1e-7), key
    summary = json.loads((two / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(one.val_loss, rel=RTOL)
    assert summary["val_curve"] == pytest.approx(one.val_curve, rel=RTOL)  # eval_every on 2 ranks too
    assert summary["world_size"] == 2 and len(summary["peak_memory_bytes_per_rank"]) == 2
    # The model moved: the comparison is not of two untouched models.
    assert abs(one.losses[-1] - one.losses[0]) > 1e-3
    # final/ is what one process writes: an adapter, or an HF directory loadable by solotune.load.
    if name == "lora":
        a, b = _adapter(tmp_path / "one"), _adapter(two)
        assert a.keys() == b.keys() and len(a) == 12
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        assert json.loads((two / "final" / "adapter.json").read_text())["rank"] == 4
    else:
        from safetensors.torch import load_file

        a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
        b = load_file(str(two / "final" / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bf16", "fp16-amp"])
def test_low_precision_two_ranks_stay_close_to_one_process(ranks, tmp_path, name):
    """bf16 rounding happens at different points (FSDP casts whole shards, one process casts per
    op), so the curves agree to bf16 accuracy, not fp32's."""
    finetune(_cfg(ranks, name, output_dir=str(tmp_path / "one")), model=tiny_model(), tokenizer=WordTokenizer())
    one, two = _losses(tmp_path / "one"), _losses(ranks / name)
    assert len(two) == 3 and two == pytest.approx(one, rel=2e-3)
    summary = json.loads((ranks / name / "summary.json").read_text())
    assert summary["skipped_steps"] == 0 and summary["precision"] == name


def test_mixed_precision_policy_per_precision():
    from solotune.parallel.fsdp import mixed_precision

    mp = {name: mixed_precision(_policy(name)) for name in ("fp32", "fp64", "bf16-amp", "fp16-amp", "bf16")}
    assert (mp["fp32"].param_dtype, mp["fp32"].reduce_dtype) == (None, None)
    assert (mp["fp64"].param_dtype, mp["fp64"].reduce_dtype) == (None, None)
    assert (mp["bf16-amp"].param_dtype, mp["bf16-amp"].reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (mp["fp16-amp"].param_dtype, mp["fp16-amp"].reduce_dtype) == (torch.float16, torch.float32)
    assert (mp["bf16"].param_dtype, mp["bf16"].reduce_dtype) == (None, torch.float32)


def test_accumulation_reduce_scatters_once_per_window(ranks):
    """grad_accum=2: the first micro-batch's backward leaves the sharded gradients unset (no
    reduce-scatter), the window's last one sets them all. (The 6th window holds one micro-batch.)"""
    seen = json.loads((ranks / "grads-seen.json").read_text())
    assert seen == [False, True] * 5 + [True]


def test_random_init_on_shards_equals_the_single_device_init(ranks):
    from solotune.model import build_model
    from solotune.peft import apply_lora

    ref = build_model(ODD, seed=7)
    apply_lora(ref, ("wq", "wv"), 4, 8, 0.0, generator=torch.Generator().manual_seed(7))
    got = torch.load(ranks / "meta-init.pt", weights_only=True)
    want = ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ====================================================================== (b) checkpoints
def test_checkpoint_of_two_ranks_is_sharded(ranks):
    ckpts = list_checkpoints(ranks / "nodrop-cut2")
    assert [s for s, _ in ckpts] == [3]
    ckpt = load_checkpoint(ranks / "nodrop-cut2")
    assert ckpt.sharded is not None and not (ckpt.path / "weights.safetensors").exists()
    assert sorted(p.name for p in ckpt.sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert ckpt.trainer["world_size"] == 2 and len(ckpt.trainer["rng_ranks"]) == 2
    assert "optimizer" not in ckpt.trainer  # it lives in the DCP shards


@pytest.mark.parametrize("how", ["none", "fsdp"])
def test_save_on_two_ranks_resume_on_one(ranks, tmp_path, how):
    """2 ranks to step 3, then one process (plain, or an FSDP group of one) to step 6 == one
    process all the way."""
    straight = finetune(_cfg(ranks, "nodrop", output_dir=str(tmp_path / "straight")), model=tiny_model(),
                        tokenizer=WordTokenizer())
    resumed = finetune(_cfg(ranks, "nodrop", output_dir=str(tmp_path / "resumed"), distributed=how,
                            resume=str(ranks / "nodrop-cut2")), model=tiny_model(), tokenizer=WordTokenizer())
    assert resumed.steps == 6 and resumed.resumed_from.name == "step-000003"
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "straight"), rel=RTOL)
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert abs(straight.losses[-1] - straight.losses[0]) > 1e-3


def test_full_tied_model_saved_on_two_ranks_resumes_on_one(ranks, tmp_path):
    """Full fine-tuning of a tied-embedding model (SmolLM2's layout): the shared weight goes
    through DCP and back, and final/ holds no output head."""
    from safetensors.torch import load_file

    finetune(_cfg(ranks, "tied", output_dir=str(tmp_path / "straight")), model=tiny_model(cfg=TIED),
             tokenizer=WordTokenizer())
    finetune(_cfg(ranks, "tied", output_dir=str(tmp_path / "resumed"), resume=str(ranks / "tied-cut2")),
             model=tiny_model(cfg=TIED), tokenizer=WordTokenizer())
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "straight"), rel=RTOL)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_resume_on_the_same_two_ranks_is_bitwise_with_dropout(ranks):
    """Per-rank RNG streams are saved and restored: cut + resume == straight, bit for bit."""
    assert _losses(ranks / "drop-cut2") == _losses(ranks / "drop-straight2")
    a, b = _adapter(ranks / "drop-straight2"), _adapter(ranks / "drop-cut2")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_single_process_checkpoint_resumes_on_two_ranks(ranks, tmp_path):
    finetune(_cfg(ranks, "nodrop", output_dir=str(tmp_path / "straight")), model=tiny_model(), tokenizer=WordTokenizer())
    assert _losses(ranks / "nodrop-1to2") == pytest.approx(_losses(tmp_path / "straight"), rel=RTOL)
    a, b = _adapter(tmp_path / "straight"), _adapter(ranks / "nodrop-1to2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_ctrl_c_on_one_rank_stops_all_after_the_same_step(ranks):
    assert (ranks / "sigint-rank0.txt").is_file() and (ranks / "sigint-rank1.txt").is_file()
    assert [s for s, _ in list_checkpoints(ranks / "sigint")] == [2]
    assert len(_losses(ranks / "sigint")) == 2


def test_held_ctrl_c_goes_to_the_flag_handler_not_a_raise():
    """Inside a distributed run SIGINT sets a flag; the loop's update guard must hand a Ctrl-C
    it held to that handler instead of raising on this rank alone."""
    from solotune.train.interrupts import deferred_signals

    flagged = []
    previous = signal.signal(signal.SIGINT, lambda *a: flagged.append(a))
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
        assert len(flagged) == 1
    finally:
        signal.signal(signal.SIGINT, previous)


def test_adapter_can_be_read_from_a_sharded_checkpoint(ranks):
    """eval/merge/export-peft take a checkpoint folder too: the adapter is reassembled from the shards."""
    from solotune.train.weights import load_adapter

    adapter = load_adapter(ranks / "drop-cut2" / "checkpoints" / "step-000006")
    final = _adapter(ranks / "drop-cut2")
    assert adapter.weights.keys() == final.keys() and adapter.rank == 4
    for k in final:
        assert torch.equal(adapter.weights[k], final[k]), k


# ======================================================================= (c) rank 0 only
def test_only_rank_zero_prints_and_writes(ranks):
    out0 = (ranks / "stdout-rank0.txt").read_text()
    out1 = (ranks / "stdout-rank1.txt").read_text()
    assert "solotune finetune summary" in out0 and "val loss before" in out0
    assert out1 == ""
    # The Ctrl-C message (stderr) comes once, from rank 0.
    assert "interrupted: saved a checkpoint" in (ranks / "stderr-rank0.txt").read_text()
    assert "interrupted" not in (ranks / "stderr-rank1.txt").read_text()
    # One metrics line per step (a second writer would duplicate or truncate them).
    assert [json.loads(line)["step"] for line in (ranks / "lora" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5, 6]
    assert (ranks / "lora" / "loss.png").is_file()
    assert not list((ranks / "lora").glob(".*tmp*"))  # no temporary folders left behind


def test_fsdp_config_errors():
    from solotune.train import TrainConfig

    with pytest.raises(ValueError, match="TrainConfig.distributed: 'ddp' is not one of none, fsdp"):
        TrainConfig(distributed="ddp")


# ============================================================================= torchrun CLI
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")])])
def test_torchrun_cli_matches_one_process(tmp_path, device):
    """``torchrun --nproc-per-node 2 -m solotune finetune --distributed fsdp`` (gloo on CPU, NCCL on
    2 GPUs) writes the same loss curve as ``python -m solotune finetune`` with the same flags."""
    from solotune.checkpoint.hf import save_hf
    from solotune.model import build_model

    cfg = TINY.replace(vocab_size=32000)  # the bundled LLaMA-2 tokenizer's vocabulary
    model_dir = tmp_path / "tiny-hf"
    save_hf(cfg, build_model(cfg, seed=0).state_dict(), model_dir)
    tok = Path(__file__).resolve().parents[1] / "assets" / "llama2_tokenizer.model"
    (model_dir / "tokenizer.model").write_bytes(tok.read_bytes())
    flags = ["finetune", "--model", str(model_dir), "--device", device, "--max-steps", "3", "--batch-size", "4",
             "--grad-accum", "2", "--train-range", "0:40", "--val-samples", "8", "--max-seq-len", "64",
             "--lr", "1e-2", "--lora-dropout", "0", "--no-progress", "--no-generate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **NVLS_OFF}
    one = subprocess.run([sys.executable, "-m", "solotune", *flags, "--output-dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "solotune", *flags,
                          "--output-dir", str(tmp_path / "two"), "--distributed", "fsdp"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=RTOL if device == "cpu" else 1e-5)
    assert two.stdout.count("solotune finetune summary") == 1  # rank 0 only
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


# ====================================================================== benchmark collector
def test_fsdp_cells_scaling_and_failures(tmp_path):
    """benchmarks/fsdp_cells.py: steady-state rate after the warm-up steps, scaling against the
    plain 1-GPU cell of the same per-GPU configuration, an OOM cell reported as such."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fsdp_cells", Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp_cells.py")
    cells_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cells_mod)

    def fake(name: str, world: int, distributed: str, batch: int, step_s: float, tokens_per_step: int) -> None:
        d = tmp_path / name
        (d / "run").mkdir(parents=True)
        (d / "cmd.txt").write_text("cmd\n")
        (d / "rc.txt").write_text("0\n")
        # step 1 is slow (warm-up), the rest take step_s each
        recs, t, n = [], 0.0, 0
        for s in range(1, 11):
            t += 5.0 if s == 1 else step_s
            n += tokens_per_step
            recs.append({"step": s, "time_s": t, "tokens": n})
        (d / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        cfg = {"model": "llama2-7b", "n_layers": None, "full": False, "lora_rank": 16, "precision": "bf16",
               "grad_checkpoint": "off", "distributed": distributed, "batch_size": batch, "grad_accum": 1,
               "max_seq_len": 512}
        (d / "run" / "summary.json").write_text(json.dumps({
            "config": cfg, "world_size": world, "steps": 10, "tokens_per_s": n / t, "tokens": n, "runtime_s": t,
            "peak_memory_bytes": 2**30, "peak_memory_bytes_per_rank": [2**30] * world, "trainable_params": 1,
            "total_params": 2, "avg_loss": 1.0, "device": "cuda:0"}))

    fake("a-1gpu", 1, "none", 8, 0.5, 1000)  # 2000 tok/s
    fake("a-fsdp1", 1, "fsdp", 8, 0.6, 1000)
    fake("a-fsdp2", 2, "fsdp", 16, 0.52, 2000)  # 3846 tok/s: 1.923x
    fake("b-fsdp2", 2, "fsdp", 16, 1.0, 2000)  # another 2-GPU cell of the same configuration
    (tmp_path / "c-oom").mkdir()
    (tmp_path / "c-oom" / "cmd.txt").write_text("cmd\n")
    (tmp_path / "c-oom" / "rc.txt").write_text("1\n")
    (tmp_path / "c-oom" / "log.txt").write_text("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    assert cells_mod.main([str(tmp_path), "--warmup", "1"]) == 0
    cells = {c["cell"]: c for c in json.loads((tmp_path / "cells.json").read_text())}
    assert cells["a-1gpu"]["tokens_per_s"] == pytest.approx(2000.0)
    assert cells["a-1gpu"]["scaling"] == pytest.approx(1.0)
    assert cells["a-fsdp2"]["scaling"] == pytest.approx(2000 / 0.52 / 2000)
    assert cells["a-fsdp2"]["scaling_efficiency"] == pytest.approx(2000 / 0.52 / 2000 / 2)
    assert cells["a-fsdp2"]["scaling_vs_fsdp1"] == pytest.approx((2000 / 0.52) / (1000 / 0.6))
    assert cells["a-fsdp2"]["per_gpu_batch"] == 8 and cells["a-fsdp2"]["world_size"] == 2
    assert cells["b-fsdp2"]["baseline_cell"] == "a-1gpu"
    assert cells["c-oom"]["status"] == "oom" and cells["c-oom"]["scaling"] is None
    assert "| a-fsdp2 | ok | 2 (fsdp) | 8 |" in (tmp_path / "results.md").read_text()
