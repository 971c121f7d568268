"""A model tuned on a conversation through its chat template answers with that conversation's
assistant turn and stops at EOS (``<|im_end|>``) under ``generate --chat``: the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solotune.checkpoint import save_hf
from solotune.cli import main
from solotune.config import ModelConfig
from solotune.model import build_model

# SmolLM2's vocab (its tokenizer and chat template), a tiny random body: quick to memorise on a CPU.
CFG = ModelConfig(name="tiny-smollm2-vocab", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152,
                  hidden_dim=64, max_seq_len=128)
QUESTION = "What color is the sky?"
ANSWER = "The sky is blue."


@pytest.fixture(scope="module")
def tiny_chat_base(tmp_path_factory, smollm2_gguf) -> Path:
    from solotune.tokenizer import load_tokenizer
    from solotune.train.weights import write_tokenizer

    d = save_hf(CFG, build_model(CFG, seed=0).state_dict(), tmp_path_factory.mktemp("base") / "hf")
    write_tokenizer(load_tokenizer(smollm2_gguf), d)  # tokenizer.json + tokenizer_config.json (chat template)
    return d


def test_tuned_chat_answer_stops_at_eos(tmp_path, tiny_chat_base, capsys) -> None:
    conv = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    data = tmp_path / "chat.jsonl"
    data.write_text((json.dumps(conv) + "\n") * 2)  # one to train on, one held out (the same conversation)
    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(tiny_chat_base), "--data", str(data), "--template", "chat", "--full",
               "--lr", "1e-2", "--lr-schedule", "constant", "--warmup-steps", "0", "--max-steps", "25",
               "--batch-size", "1", "--grad-accum", "1", "--eval-every", "0", "--max-seq-len", "128",
               "--device", "cpu", "--no-progress", "--log-every", "100", "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "template chat: records of the splits 2 through the model's chat template" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < 0.1 * summary["val_loss_before"]  # memorised (same conversation held out)
    assert summary["generations_after"] == [ANSWER] * 3

    # The CLI: greedy, --chat, far more room than the answer needs: the answer alone means it stopped.
    rc = main(["generate", "--model", str(out / "final"), "--chat", "--prompt", QUESTION, "--max-new-tokens", "32",
               "--device", "cpu"])
    assert rc == 0 and capsys.readouterr().out.strip() == ANSWER

    # eval renders the records the same way (--template chat): the run's own final val loss
    rc = main(["eval", "--model", str(out / "final"), "--data", str(data), "--template", "chat", "--device", "cpu",
               "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-4)

    # The tokens: the last generated one is the tokenizer's EOS (<|im_end|>, what the template closes turns with).
    import torch

    from solotune import load
    from solotune.generate import encode_prompt, generate_tokens

    model, tok = load(str(out / "final"), dtype=torch.float32, device="cpu")
    (new,) = generate_tokens(model, [encode_prompt(tok, QUESTION, chat=True)], max_new_tokens=32,
                             stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    assert new[-1] == tok.eos_id and tok.id_to_token(new[-1]) == "<|im_end|>"
    assert tok.decode(new) == ANSWER and len(new) < 32
