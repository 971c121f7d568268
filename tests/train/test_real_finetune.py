"""The real model: SmolLM2-135M, 16 LoRA steps on the bundled train split lower the validation loss."""

from __future__ import annotations

import pytest

from solotune.train import TrainConfig, finetune


@pytest.mark.slow
def test_smollm2_lora_16_steps_lower_val_loss(tmp_path):
    import solotune

    try:
        model, tokenizer = solotune.load("smollm2-135m")
    except Exception as e:  # no cached copy and no registry access
        pytest.skip(f"SmolLM2-135M unavailable: {e}")
    # 16 steps x 2 examples = the first 32 records of the seeded order; 12 val records (same ones
    # before and after, so the comparison is exact, not sampled).
    cfg = TrainConfig(model="smollm2-135m", output_dir=str(tmp_path / "run"), max_steps=16, lr=1e-3,
                      warmup_steps=2, batch_size=1, grad_accum=2, max_seq_len=256, val_samples=12,
                      generate_samples=False, progress=False, device="cpu")
    res = finetune(cfg, model=model, tokenizer=tokenizer)
    assert res.steps == 16 and res.trainable_params == 921_600  # r=16 on wq (576x576) + wv (576x192), 30 layers
    assert res.val_loss < res.val_loss_before - 0.05, (res.val_loss_before, res.val_loss)
    assert (tmp_path / "run" / "final" / "adapter.safetensors").is_file()
