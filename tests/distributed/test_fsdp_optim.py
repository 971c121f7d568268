"""8-bit AdamW and optimizer-in-backward under FSDP2 on CPU: 2 processes, gloo, full fine-tuning
of a small model whose matrices are 8-bit (rows shorter than a block, rows of a partial last
block, an embedding of 129 rows split 65 / 64), through the one training loop.

8-bit AdamW: (a) 2 ranks follow the single-process curve; (b) the states are DTensors placed like
their parameters; (c) a checkpoint of 2 ranks loads into one process with every state tensor
equal, bit for bit, to the 2 ranks' gathered state at that step, and the resumed run follows the
uninterrupted one; (d) a single-process checkpoint put onto 2 ranks' shards gathers back to itself
bit for bit. A state that was not resharded (a rank's rows written as the whole, or scales cut
across rows) fails (c) and (d).

In backward: (e) FSDP's reduce-scatter runs the sharded parameters' hooks: the 2-rank curve equals
the 2-rank plain step's bit for bit, with one sharded gradient alive at a time; its checkpoint
resumes in one process, and a single-process one on 2 ranks.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from gloo_ranks import spawn_ranks  # noqa: E402
from train_fixtures import TINY, CtrlCAfter, WordTokenizer, tiny_config, tiny_model, write_records  # noqa: E402

from solotune.optim import blockwise  # noqa: E402
from solotune.train import finetune  # noqa: E402
from solotune.train.state import load_checkpoint  # noqa: E402

WORLD = 2
CFG = TINY.replace(dim=64, hidden_dim=320, vocab_size=129)
RUN = dict(full=True, optimizer="adamw-8bit", lr=3e-3, weight_decay=0.1, max_steps=6, batch_size=4, grad_accum=1)
# fp32 gradients of 2 ranks' partial sums differ from one process's in the last bits; a moment
# that lands next to a decision boundary may then round to the neighbouring code.
RTOL = 1e-5
NO_CLIP = dict(max_grad_norm=None)
INB = dict(NO_CLIP, optimizer_in_backward=True)


def _cfg(root: Path, name: str, **kw):
    return tiny_config(root, root / "records.json", **{"output_dir": str(root / name), **RUN, **kw})


def _model():
    return tiny_model(cfg=CFG)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """"name/key" -> the whole state tensor (DTensors gathered: a collective call), on the CPU."""
    out = {}
    for name, p in model.named_parameters():
        for k, v in sorted(optimizer.state[p].items()):
            if torch.is_tensor(v):
                out[f"{name}/{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
    return out


class GatherAt:
    """After optimizer step ``n``: the gathered state to ``path`` (rank 0), the placement facts of
    every 8-bit state to ``path.json``; then a Ctrl-C when ``stop``."""

    def __init__(self, n: int, path: Path, rank: int, stop: bool) -> None:
        self.n, self.path, self.rank, self.stop = n, path, rank, stop

    def after_step(self, model, optimizer, step):
        if step != self.n:
            return
        full = _full_states(model, optimizer)
        facts = {}
        for name, p in model.named_parameters():
            st = optimizer.state[p]
            if "m_codes" in st:
                rows, nb = blockwise.scale_shape(p.shape)
                facts[name] = dict(
                    dtensor=all(hasattr(st[k], "to_local") for k in ("m_codes", "m_absmax", "v_codes", "v_absmax")),
                    placements=[str(st[k].placements) == str(p.placements) for k in ("m_codes", "m_absmax")],
                    shapes=[list(st["m_codes"].shape) == list(p.shape), list(st["m_absmax"].shape) == [rows, nb]],
                    local_rows=[st["m_codes"].to_local().shape[0], st["v_absmax"].to_local().shape[0],
                                p.to_local().shape[0]])
        if self.rank == 0:
            torch.save(full, self.path)
        (self.path.parent / f"{self.path.stem}-rank{self.rank}.json").write_text(json.dumps(facts))
        if self.stop:
            raise KeyboardInterrupt


# ================================================================================ the 2 ranks
def _scenarios(rank: int, root: Path) -> None:
    from solotune.parallel.fsdp import FSDPContext
    from solotune.train.optim import make_optimizer, make_schedule
    from solotune.train.precision import get_policy
    from solotune.train.sharded import load_training_checkpoint

    from solotune.optim import OptimizerInBackward

    tok = WordTokenizer()
    finetune(_cfg(root, "straight2", distributed="fsdp"), model=_model(), tokenizer=tok)
    # In backward vs the plain step, both on 2 ranks; count the gradients alive at each hook.
    finetune(_cfg(root, "plain2", distributed="fsdp", **NO_CLIP), model=_model(), tokenizer=tok)
    alive, hooked = [], OptimizerInBackward._on_grad

    def probe(self, p):
        alive.append(sum(q.grad is not None for q in self.params))
        hooked(self, p)

    OptimizerInBackward._on_grad = probe  # this worker process only
    try:
        finetune(_cfg(root, "inb2", distributed="fsdp", **INB), model=_model(), tokenizer=tok)
        with contextlib.suppress(KeyboardInterrupt):
            finetune(_cfg(root, "inb2-cut", distributed="fsdp", **INB), model=_model(), tokenizer=tok,
                     instrument=CtrlCAfter(3))
        one = _cfg(root, "inb1-cut", **INB)  # a single-process in-backward checkpoint resumed on 2 ranks
        finetune(one.replace(resume=one.output_dir, output_dir=str(root / "inb1to2"), distributed="fsdp"),
                 model=_model(), tokenizer=tok)
    finally:
        OptimizerInBackward._on_grad = hooked
    (root / f"alive-rank{rank}.json").write_text(json.dumps(alive))
    with contextlib.suppress(KeyboardInterrupt):
        finetune(_cfg(root, "cut2", distributed="fsdp"), model=_model(), tokenizer=tok,
                 instrument=GatherAt(3, root / "cut2-states.pt", rank, stop=True))
    # The single-process checkpoint (written before the spawn) onto this run's shards, gathered back.
    cfg = _cfg(root, "onto2", distributed="fsdp")
    with FSDPContext(torch.device("cpu")) as par:
        model = par.wrap(_model(), cfg, get_policy("fp32"))
        opt = make_optimizer("adamw-8bit", model, lr=cfg.lr, weight_decay=cfg.weight_decay, device=par.device)
        make_schedule(opt, warmup=0, total=6, schedule="constant", min_ratio=0.0)  # as the loop: initial_lr
        load_training_checkpoint(par, load_checkpoint(root / "cut1"), model, opt, lora=False)
        full = _full_states(model, opt)
        if rank == 0:
            torch.save(full, root / "onto2-states.pt")




@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp8")
    write_records(root / "records.json")
    torch.set_num_threads(1)
    # One process: all the way (the reference), and cut after step 3 with its state gathered.
    finetune(_cfg(root, "straight1"), model=_model(), tokenizer=WordTokenizer())
    with contextlib.suppress(KeyboardInterrupt):
        finetune(_cfg(root, "cut1"), model=_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(3))
    with contextlib.suppress(KeyboardInterrupt):
        finetune(_cfg(root, "inb1-cut", **INB), model=_model(), tokenizer=WordTokenizer(), instrument=CtrlCAfter(3))
    spawn_ranks(_scenarios, WORLD, root)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_states_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ============================================================================ (a), (b)
def test_two_ranks_follow_the_single_process_curve(ranks):
    one, two = _losses(ranks / "straight1"), _losses(ranks / "straight2")
    assert len(two) == 6 and two == pytest.approx(one, rel=RTOL)
    assert abs(one[-1] - one[0]) > 1e-3  # the model moved


def test_states_are_dtensors_shaped_and_placed_like_their_parameters(ranks):
    facts = [json.loads((ranks / f"cut2-states-rank{r}.json").read_text()) for r in range(WORLD)]
    # every matrix of >= 4096 elements is 8-bit: wq, wo, w1, w2, w3 of 2 layers, embedding, head
    assert len(facts[0]) == 5 * 2 + 2, sorted(facts[0])
    for rank_facts in facts:
        for name, f in rank_facts.items():
            assert f["dtensor"] and all(f["placements"]) and all(f["shapes"]), (name, f)
            assert len(set(f["local_rows"])) == 1, (name, f)  # codes, scales and weight: this rank's rows
    # the 129-row embedding splits unevenly: 65 rows on rank 0, 64 on rank 1
    emb = [n for n in facts[0] if "embed" in n or "tok" in n][0]
    assert [facts[r][emb]["local_rows"][0] for r in range(WORLD)] == [65, 64]


# ================================================================================== (c), (d)
def test_checkpoint_of_two_ranks_loads_into_one_process_bit_for_bit(ranks):
    from solotune.parallel import SingleProcess
    from solotune.train.optim import make_optimizer
    from solotune.train.sharded import load_training_checkpoint

    ckpt = load_checkpoint(ranks / "cut2")
    assert ckpt.sharded is not None and ckpt.trainer["world_size"] == 2
    model = _model()
    opt = make_optimizer("adamw-8bit", model, lr=3e-3, weight_decay=0.1, device=torch.device("cpu"))
    load_training_checkpoint(SingleProcess(torch.device("cpu")), ckpt, model, opt, lora=False)
    loaded = _full_states(model, opt)
    want = torch.load(ranks / "cut2-states.pt", weights_only=True)
    assert sum(k.endswith("/m_codes") for k in want) == 12
    _assert_states_equal(loaded, want)
    assert {opt.state[p]["step"] for p in model.parameters()} == {3}


def test_save_on_two_ranks_resume_on_one_follows_the_uninterrupted_run(ranks, tmp_path):
    cfg = _cfg(ranks, "cut2", output_dir=str(tmp_path / "resumed"), resume=str(ranks / "cut2"))
    resumed = finetune(cfg, model=_model(), tokenizer=WordTokenizer())
    assert resumed.steps == 6 and resumed.resumed_from.name == "step-000003"
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(ranks / "straight1"), rel=RTOL)


def test_single_process_checkpoint_onto_two_ranks_gathers_back_bit_for_bit(ranks):
    from solotune.parallel import SingleProcess
    from solotune.train.optim import make_optimizer
    from solotune.train.sharded import load_training_checkpoint

    model = _model()
    opt = make_optimizer("adamw-8bit", model, lr=3e-3, weight_decay=0.1, device=torch.device("cpu"))
    load_training_checkpoint(SingleProcess(torch.device("cpu")), load_checkpoint(ranks / "cut1"), model, opt,
                             lora=False)
    _assert_states_equal(torch.load(ranks / "onto2-states.pt", weights_only=True), _full_states(model, opt))


# ================================================================================ (e) in backward
def test_in_backward_on_two_ranks_equals_the_plain_step_bit_for_bit(ranks):
    plain, inb = _losses(ranks / "plain2"), _losses(ranks / "inb2")
    assert len(inb) == 6 and inb == plain
    norms = [json.loads(line)["grad_norm"] for line in (ranks / "inb2" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["grad_norm"] for line in (ranks / "plain2" / "metrics.jsonl").read_text().splitlines()]
    assert norms == pytest.approx(want, rel=1e-5)  # the ranks' squares summed: the whole gradient's norm
    n_params = sum(1 for _ in _model().parameters())
    for r in range(WORLD):
        alive = json.loads((ranks / f"alive-rank{r}.json").read_text())
        assert len(alive) == (6 + 3 + 3) * n_params  # every parameter's hook ran once per step, on every rank
        assert max(alive) == 1  # the sharded gradient being used is the only one


def test_in_backward_checkpoint_of_two_ranks_resumes_in_one_process(ranks, tmp_path):
    ckpt = load_checkpoint(ranks / "inb2-cut")
    assert ckpt.sharded is not None and ckpt.trainer["world_size"] == 2
    cfg = _cfg(ranks, "inb2-cut", output_dir=str(tmp_path / "resumed"), resume=str(ranks / "inb2-cut"), **INB)
    resumed = finetune(cfg, model=_model(), tokenizer=WordTokenizer())
    assert resumed.steps == 6
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(ranks / "plain2"), rel=RTOL)


def test_single_process_in_backward_checkpoint_resumes_on_two_ranks(ranks):
    assert _losses(ranks / "inb1to2") == pytest.approx(_losses(ranks / "plain2"), rel=RTOL)


@pytest.mark.parametrize("how", ["none", "fsdp"])
def test_flat_layout_checkpoint_is_refused_in_one_line(ranks, tmp_path, how):
    """A single-file checkpoint whose 8-bit state is in the earlier flat layout, with rows that are
    not whole blocks (cols 64, 320): resuming it (one process, or put onto FSDP shards) names the
    checkpoint and the parameter in one line instead of loading codes into the wrong rows."""
    import shutil

    from solotune.checkpoint.common import CheckpointError
    from solotune.train.state import TRAINER_STATE

    run = tmp_path / "old"
    shutil.copytree(ranks / "cut1", run)
    path = run / "checkpoints" / "step-000003" / TRAINER_STATE
    trainer = torch.load(path, weights_only=True)
    for st in trainer["optimizer"]["state"].values():
        for k in [k for k in st if k.endswith(("_codes", "_absmax"))]:
            st[k] = st[k].reshape(-1) if k.endswith("_codes") else torch.zeros(blockwise.n_blocks(st[k.replace(
                "absmax", "codes")].numel()))
    torch.save(trainer, path)
    cfg = _cfg(ranks, "cut1", output_dir=str(tmp_path / "resumed"), resume=str(run), distributed=how)
    with pytest.raises(CheckpointError, match=r"step-000003: 8-bit AdamW state of parameter \d+ \[.*cannot be "
                                              r"converted exactly") as e:
        finetune(cfg, model=_model(), tokenizer=WordTokenizer())
    assert "\n" not in str(e.value)
