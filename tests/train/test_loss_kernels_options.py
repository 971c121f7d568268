"""``TrainConfig.loss`` and ``TrainConfig.kernels`` reach the one loop: the step-1 gradients and the
validation losses of a run with the fused linear-cross-entropy loss and the kernels swapped in
(which on CPU take the reference path) equal the default run's."""

from __future__ import annotations

import pytest
import torch

from solotune.train import finetune

from train_fixtures import WordTokenizer, tiny_config, tiny_model, write_records


class GradProbe:
    def __init__(self):
        self.grads = None

    def before_step(self, model, optimizer, step):
        if step == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("full", [False, True])  # LoRA (frozen head) and full fine-tuning (head trained)
def test_loss_and_kernel_options_give_the_reference_run(tmp_path, full):
    data = write_records(tmp_path / "records.json")
    runs = []
    # (chunked is checked through the model in tests/train/test_loss.py; one option pair keeps this short)
    for name, kw in (("ref", {}), ("fused", dict(loss="fused-linear-ce", kernels="triton"))):
        probe = GradProbe()
        cfg = tiny_config(tmp_path, data, max_steps=1, full=full, output_dir=str(tmp_path / name), save=False, **kw)
        res = finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer(), instrument=probe)
        runs.append((res, probe.grads))
    (ref, g0), *others = runs
    for res, g in others:
        assert res.val_loss_before == pytest.approx(ref.val_loss_before, rel=1e-6)
        assert res.final_loss == pytest.approx(ref.final_loss, rel=1e-6)
        assert g.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=1e-5, atol=1e-7)
