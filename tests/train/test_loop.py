"""The training loop: loss masking, accumulation == one big batch, checkpointing == none, LR
schedule, data order, output layout and config errors (tiny random model, fake tokenizer, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from solotune.data import IGNORE_INDEX
from solotune.peft import lora_state_dict
from solotune.train import TrainConfig, finetune
from solotune.train.loss import token_loss_sum
from solotune.train.optim import lr_factor
from solotune.train.run_state import DataStream

from train_fixtures import WordTokenizer, tiny_config, tiny_model, write_records


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "records.json")


class GradProbe:
    """Instrument that keeps a copy of every trainable gradient of step 1, before the update."""

    def __init__(self):
        self.grads = None

    def before_step(self, model, optimizer, step):
        if step == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------- the loss
def test_loss_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, 2],
                           [IGNORE_INDEX, IGNORE_INDEX, 7, 2, IGNORE_INDEX, IGNORE_INDEX]])
    # By hand: position t predicts labels[t + 1], only where that label is a target.
    want = sum(F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum")
               for b in range(2) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX)
    assert torch.allclose(token_loss_sum(logits, labels), want, atol=1e-6)
    # Logits at positions whose next label is masked (and the last position) do not matter.
    noisy = logits.clone()
    noisy[0, :2] += 100 * torch.randn(2, 11, generator=g)
    noisy[0, 5] += 100.0
    noisy[1, 3:] -= 50.0
    assert torch.allclose(token_loss_sum(noisy, labels), want, atol=1e-6)
    # The loss is computed in fp32 from bf16 logits, in fp64 from fp64 ones.
    assert token_loss_sum(logits.bfloat16(), labels).dtype == torch.float32
    assert token_loss_sum(logits.double(), labels).dtype == torch.float64


def test_loop_counts_only_target_tokens(tmp_path, data):
    res = finetune(tiny_config(tmp_path, data, max_steps=3), model=tiny_model(), tokenizer=WordTokenizer())
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    from solotune.data import AlpacaDataset, load_records, split

    train, _ = split(load_records(data), train=range(0, 32), val=range(32, 48))
    ds = AlpacaDataset(train, WordTokenizer(), 96)
    from solotune.data import epoch_order

    order = epoch_order(32, 0, 0)
    # 3 steps x 2 micro-batches x 2 examples = the first 12 examples of epoch 0's order.
    first12 = [ds[i] for i in order[:12]]
    assert res.target_tokens == sum(e.num_targets for e in first12) == recs[-1]["target_tokens"]
    assert res.tokens == sum(len(e.input_ids) for e in first12)  # padding is not counted


# ------------------------------------------------------------------------- accumulation, checkpointing
@pytest.mark.parametrize("full", [False, True])
def test_grad_accumulation_equals_one_big_batch(tmp_path, data, full):
    """k micro-batches of 1 example == 1 batch of k examples (right-padded), in float64."""
    k = 4
    grads = []
    for bs, accum in ((1, k), (k, 1)):
        probe = GradProbe()
        cfg = tiny_config(tmp_path, data, precision="fp64", batch_size=bs, grad_accum=accum, max_steps=1,
                          full=full, output_dir=str(tmp_path / f"run{bs}"))
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=probe)
        grads.append(probe.grads)
    a, b = grads
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert a[n].dtype == torch.float64
        assert (a[n] - b[n]).abs().max() <= 1e-6 * max(1.0, b[n].abs().max()), n
    assert any(g.abs().max() > 0 for g in a.values())


def test_accumulation_weights_tokens_not_micro_batches(tmp_path, data):
    """The window's examples have different target counts, so averaging per micro-batch (the
    naive alternative) would give a different gradient: the equality above is not a coincidence."""
    from solotune.data import AlpacaDataset, epoch_order, load_records, split

    train, _ = split(load_records(data), train=range(0, 32), val=range(32, 48))
    ds = AlpacaDataset(train, WordTokenizer(), 96)
    counts = {ds[i].num_targets for i in epoch_order(32, 0, 0)[:4]}
    assert len(counts) > 1


@pytest.mark.parametrize("policy", ["all", "every:2"])
def test_grad_checkpointing_gives_the_same_gradients(tmp_path, data, policy):
    grads = []
    for gc in ("off", policy):
        probe = GradProbe()
        cfg = tiny_config(tmp_path, data, grad_checkpoint=gc, max_steps=1, lora_dropout=0.1,
                          output_dir=str(tmp_path / gc.replace(":", "")))
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=probe)
        grads.append(probe.grads)
    for n in grads[0]:
        # dropout masks are replayed by the recomputation (RNG state saved per checkpointed block)
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)


def test_lora_trains_only_adapters_and_full_trains_everything(tmp_path, data):
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(tiny_config(tmp_path, data, max_steps=3), model=model, tokenizer=WordTokenizer())
    for name, p in model.named_parameters():
        if "lora" not in name:
            assert torch.equal(p, base[name.replace(".base", "")]), name
    assert any(t.abs().max() > 0 for k, t in lora_state_dict(model).items() if k.endswith("lora_b"))
    assert res.trainable_params == sum(t.numel() for t in lora_state_dict(model).values())

    model = tiny_model()
    res = finetune(tiny_config(tmp_path, data, max_steps=2, full=True, output_dir=str(tmp_path / "full")),
                   model=model, tokenizer=WordTokenizer())
    assert res.trainable_params == res.total_params == sum(p.numel() for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert len(changed) == len(list(model.parameters()))


@pytest.mark.parametrize("kw, drop", [(dict(full=True, lr=1e-2), 1.0),
                                      (dict(lr=5e-2, lora_targets=("wq", "wv", "w2")), 0.05)])
def test_training_lowers_the_loss(tmp_path, data, kw, drop):
    # Random words from a 30-word list: full FT quickly learns their unigram distribution; LoRA on
    # a random tiny model (small embeddings -> small logits) moves more slowly but measurably.
    res = finetune(tiny_config(tmp_path, data, max_steps=24, **kw), model=tiny_model(), tokenizer=WordTokenizer())
    assert res.val_loss < res.val_loss_before - drop
    assert sum(res.losses[-4:]) / 4 < sum(res.losses[:4]) / 4


# ------------------------------------------------------------------------------------ schedule, data
def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, warmup=2, total=10, schedule="cosine", min_ratio=0.1) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(f[2:], f[3:]))  # strictly decreasing after warmup
    assert f[-1] > 0.1 and abs(lr_factor(10, 2, 10, "cosine", 0.1) - 0.1) < 1e-12
    assert [lr_factor(s, 0, 10, "constant", 0.0) for s in range(10)] == [1.0] * 10


def test_data_stream_epochs_and_resume_position():
    s = DataStream(5, seed=3, batch_size=2, epochs=2)
    windows = []
    while w := s.take_window(2):
        windows.append(w)
    flat = [i for w in windows for b in w for i in b]
    assert len(flat) == 10 and sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert flat[:5] != flat[5:]  # reshuffled per epoch
    assert [len(b) for b in windows[1]] == [2, 2]  # micro-batches cross the epoch boundary
    # Restoring (epoch, index) continues the same sequence.
    a = DataStream(5, 3, 2, None)
    a.take_window(3)
    b = DataStream(5, 3, 2, None)
    b.load_state_dict(a.state_dict())
    assert a.take_window(4) == b.take_window(4)


def test_epochs_mode_runs_whole_passes(tmp_path, data):
    res = finetune(tiny_config(tmp_path, data, max_steps=None, epochs=1, train_range=(0, 14)),
                   model=tiny_model(), tokenizer=WordTokenizer())
    assert res.steps == math.ceil(14 / 4)  # the last window is partial


# ----------------------------------------------------------------------------------- output layout
def test_output_layout(tmp_path, data):
    res = finetune(tiny_config(tmp_path, data, max_steps=5, save_every=2, eval_every=2), model=tiny_model(),
                   tokenizer=WordTokenizer())
    out = tmp_path / "run"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    assert res.val_curve == [res.val_loss_before, recs[1]["val_loss"], recs[3]["val_loss"], res.val_loss]
    for r in recs:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "peak_mem"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert [r["tokens"] for r in recs] == sorted(r["tokens"] for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == res.final_loss == recs[-1]["loss"]
    assert summary["val_loss"] == res.val_loss and summary["val_loss_before"] == res.val_loss_before
    assert summary["peak_memory_bytes"] == res.peak_memory_bytes > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000005"]
    assert sorted(p.name for p in (out / "final").iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*tmp*"))  # no temp leftovers


def test_full_finetune_final_is_an_hf_checkpoint(tmp_path, data):
    from solotune.checkpoint import load_checkpoint

    model = tiny_model()
    finetune(tiny_config(tmp_path, data, max_steps=2, full=True), model=model, tokenizer=WordTokenizer())
    ck = load_checkpoint(tmp_path / "run" / "final")
    for k, v in ck.state_dict.items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


def test_fresh_run_refuses_a_used_output_dir(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=1)
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    with pytest.raises(FileExistsError, match="already holds"):
        finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    res = finetune(cfg.replace(overwrite=True, max_steps=2), model=tiny_model(), tokenizer=WordTokenizer())
    assert res.steps == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw, field", [
    ({"precision": "fp8"}, "precision"), ({"lora_targets": ("wq", "qkv")}, "lora_targets"),
    ({"grad_checkpoint": "sometimes"}, "grad_checkpoint"), ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"), ({"train_range": (5, 5)}, "train_range"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"n_layers": 2}, "n_layers"), ({"lr_schedule": "linear"}, "lr_schedule"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kw)


def test_config_round_trips_through_json():
    cfg = TrainConfig.profile("quickstart", lora_targets="wq,wk,w2", val_range=[400, 450])
    assert cfg.lora_targets == ("wq", "wk", "w2") and cfg.val_range == (400, 450)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig().lr == 1e-5 and TrainConfig().grad_accum == 8 and TrainConfig().lora_rank == 16


# ---------------------------------------------------------------------------------- instrument, RNG
class CountingInstrument:
    """forward_context around every micro-batch; saved_tensors_hooks see the activations."""

    def __init__(self):
        self.entered, self.saved_bytes, self.before, self.after = 0, 0, [], []

    def forward_context(self):
        self.entered += 1

        def pack(t):
            self.saved_bytes += t.numel() * t.element_size()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def before_step(self, model, optimizer, step):
        self.before.append(step)

    def after_step(self, model, optimizer, step):
        self.after.append(step)


def test_instrument_hooks_are_called(tmp_path, data):
    inst = CountingInstrument()
    finetune(tiny_config(tmp_path, data, max_steps=3), model=tiny_model(), tokenizer=WordTokenizer(), instrument=inst)
    assert inst.entered == 3 * 2  # steps x grad_accum
    assert inst.before == inst.after == [1, 2, 3]
    assert inst.saved_bytes > 0


def test_finetune_leaves_the_global_rng_alone(tmp_path, data):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    finetune(tiny_config(tmp_path, data, max_steps=2, lora_dropout=0.2), model=tiny_model(), tokenizer=WordTokenizer())
    assert torch.equal(torch.get_rng_state(), state)


def test_benchmark_knobs_no_saving_no_validation(tmp_path, data):
    res = finetune(tiny_config(tmp_path, data, max_steps=2, save=False, val_samples=0, max_samples=8),
                   model=tiny_model(), tokenizer=WordTokenizer())
    out = tmp_path / "run"
    assert res.val_loss is None and res.val_loss_before is None and res.final_dir is None
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()
    assert res.tokens > 0


def test_resuming_a_finished_run_into_a_new_dir(tmp_path, data):
    cfg = tiny_config(tmp_path, data, max_steps=2)
    finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    res = finetune(cfg.replace(resume=str(tmp_path / "run"), output_dir=str(tmp_path / "again")),
                   model=tiny_model(), tokenizer=WordTokenizer())
    assert res.steps == 2 and (tmp_path / "again" / "checkpoints" / "step-000002").is_dir()
