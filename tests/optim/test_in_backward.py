"""Optimizer in backward and state offload against the plain step, on a tiny transformer: the same
updates (bit for bit on CPU fp32), gradients freed during backward, the schedule reaching every
inner optimizer, state dicts that round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.optim import AdamW8bit, HostStates, OptimizerInBackward, PerParamOptimizer
from solotune.train.optim import lr_factor, param_groups

CFG = ModelConfig(name="tiny-optim", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=128,
                  max_seq_len=64)
OPTS = {
    "adamw": lambda gs: torch.optim.AdamW(gs, lr=1e-2, foreach=False),
    "adamw-8bit": lambda gs: AdamW8bit(gs, lr=1e-2),
}


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _run(kind: str, wrap: str, steps: int = 4, resume_at: int | None = None):
    """Train a tiny model `steps` steps with a LambdaLR schedule; `wrap`: plain | per-param |
    in-backward | offload | in-backward+offload. `resume_at`: rebuild optimizer+schedule from a
    state_dict after that many steps (as a resumed run does)."""
    model = build_model(CFG, seed=0)
    build = OPTS[kind]

    def make():
        groups = param_groups(model, weight_decay=0.1)
        store = HostStates("cpu") if "offload" in wrap else None
        if wrap == "plain":
            opt = build(groups)
        elif wrap.startswith("in-backward"):
            opt = OptimizerInBackward(groups, build, store)
        else:
            opt = PerParamOptimizer(groups, build, store)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, steps, "cosine", 0.1))
        return opt, sched

    opt, sched = make()
    g = torch.Generator().manual_seed(1)
    seen_grads = []
    for step in range(steps):
        if resume_at is not None and step == resume_at:
            saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
            if hasattr(opt, "close"):
                opt.close()
            opt, sched = make()
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
        tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
        _loss(model, tokens).backward()
        seen_grads.append(sum(p.grad is not None for p in model.parameters()))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if hasattr(opt, "close"):
        opt.close()
    return model, seen_grads, opt


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("wrap", ["per-param", "in-backward", "offload", "in-backward+offload"])
def test_same_updates_as_the_plain_optimizer(kind, wrap):
    ref, _, _ = _run(kind, "plain")
    got, grads_after_backward, _ = _run(kind, wrap)
    for (n, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), n
    if wrap.startswith("in-backward"):
        assert grads_after_backward == [0] * 4  # every gradient was consumed and freed inside backward


@pytest.mark.parametrize("wrap", ["per-param", "in-backward", "in-backward+offload"])
def test_resumed_from_a_state_dict_equals_uninterrupted(wrap):
    ref, _, _ = _run("adamw-8bit", wrap, steps=5)
    got, _, _ = _run("adamw-8bit", wrap, steps=5, resume_at=2)
    for (n, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), n


def test_schedule_reaches_every_inner_optimizer():
    model = build_model(CFG, seed=0)
    opt = OptimizerInBackward(param_groups(model, 0.0), OPTS["adamw"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    opt.step()  # nothing to do (no gradients), as the loop calls it before the schedule
    sched.step()
    assert {inner.param_groups[0]["lr"] for inner in opt.inner.values()} == {5e-3}
    opt.close()


def test_grad_norm_is_reported_and_clipping_refused():
    model = build_model(CFG, seed=0)
    ref = build_model(CFG, seed=0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    _loss(ref, tokens).backward()
    want = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), float("inf")))
    opt = OptimizerInBackward(param_groups(model, 0.0), OPTS["adamw"])
    _loss(model, tokens).backward()
    assert opt.clip_grad_norm(opt.params, None) == pytest.approx(want, rel=1e-5)
    assert opt.clip_grad_norm(opt.params, None) == 0.0  # reset by the call
    with pytest.raises(RuntimeError, match="global norm"):
        opt.clip_grad_norm(opt.params, 1.0)
    opt.close()
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, tokens).backward()  # closed: the hooks update nothing any more
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_offloaded_states_live_in_the_store_between_updates():
    model = build_model(CFG, seed=0)
    store = HostStates("cpu")
    opt = PerParamOptimizer(param_groups(model, 0.0), OPTS["adamw-8bit"], store)
    _loss(model, torch.randint(0, CFG.vocab_size, (2, 9))).backward()
    opt.step()
    for p in opt.params:
        host = store.host[id(p)]
        assert all(opt.state[p][k] is v for k, v in host.items())
    # one step: each state was created by its update on the device and copied to the host once
    assert store.moved_bytes == sum(v.nbytes for h in store.host.values() for v in h.values())


def test_a_state_dict_of_another_shape_is_refused():
    model = build_model(CFG, seed=0)
    opt = PerParamOptimizer(param_groups(model, 0.0), OPTS["adamw"])
    with pytest.raises(ValueError, match="per-parameter"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_state_dict_is_torch_format_and_the_earlier_format_still_loads():
    """torch's layout (one group per parameter, state by position: what DCP's get_state_dict /
    set_state_dict expect); a ``{"per_parameter": [...]}`` state of earlier checkpoints loads too."""
    model = build_model(CFG, seed=0)
    opt = PerParamOptimizer(param_groups(model, 0.1), OPTS["adamw-8bit"])
    assert not opt.state  # empty before the first update, as torch's (DCP initialises it then)
    for p in opt.params:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == len(opt.params) and sorted(sd["state"]) == list(range(len(opt.params)))
    old = {"per_parameter": [opt.inner[p].state_dict() for p in opt.params]}
    for saved in (copy.deepcopy(sd), copy.deepcopy(old)):
        other = PerParamOptimizer(param_groups(build_model(CFG, seed=0), 0.1), OPTS["adamw-8bit"])
        other.load_state_dict(saved)
        for p, q in zip(opt.params, other.params):
            a, b = opt.state[p], other.state[q]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                                for k in a)
    # what FSDP's loading of a single-file checkpoint reads: torch's format, from either
    up = opt.upgrade_state_dict(copy.deepcopy(old))
    assert [g["params"] for g in up["param_groups"]] == [g["params"] for g in sd["param_groups"]]
    assert all(torch.equal(up["state"][i]["m_codes"], sd["state"][i]["m_codes"]) for i in sd["state"]
               if "m_codes" in sd["state"][i])
    with pytest.raises(ValueError, match="expected .* per-parameter states"):
        other.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:3]})


def test_in_backward_steps_a_gradient_left_outside_backward():
    """torch's state-dict code creates an empty optimizer's state by setting zero gradients and
    calling step() with lr 0: in backward, step() must then update (create the state)."""
    model = build_model(CFG, seed=0)
    opt = OptimizerInBackward(param_groups(model, 0.1), OPTS["adamw-8bit"])
    before = [p.detach().clone() for p in opt.params]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in opt.params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert len(opt.state) == len(opt.params) and all(st["step"] == 1 for st in opt.state.values())
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, opt.params))
    opt.close()
