"""Alpaca data pipeline: template text, exact prompt masking with the real LLaMA-2 tokenizer,
validation errors, split, epoch order, collate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from solotune.data import (
    IGNORE_INDEX,
    AlpacaDataset,
    DataError,
    Example,
    Record,
    collate,
    epoch_order,
    format_prompt,
    load_records,
    split,
    tokenize_record,
)
from solotune.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def asset(name: str) -> Path:
    """tests/assets copy of the shared file (the tokenizer tests put it there), else ../shared/data."""
    for p in (ROOT / "tests" / "assets" / name, ROOT.parent / "shared" / "data" / name):
        if p.is_file():
            return p
    pytest.skip(f"{name} not available")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(asset("llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(asset("llama2_tokenizer.model")))


@pytest.fixture(scope="module")
def sample():
    return load_records("alpaca-sample")


# The Stanford Alpaca prompts, written out in full here rather than imported, so a change to the
# template in the code shows up as a failure.
HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.")
HEADER_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_prompt_templates_exact() -> None:
    with_input = Record(instruction="Identify the odd one out.", input="Twitter, Instagram, Telegram", output="Telegram")
    assert format_prompt(with_input) == (
        HEADER_INPUT + "\n\n### Instruction:\nIdentify the odd one out.\n\n"
        "### Input:\nTwitter, Instagram, Telegram\n\n### Response:\n")
    no_input = {"instruction": "Give three tips for staying healthy.", "output": "x"}
    assert format_prompt(no_input) == (
        HEADER_NO_INPUT + "\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n")
    assert format_prompt({**no_input, "input": ""}) == format_prompt(no_input)


@pytest.mark.parametrize("index,has_input", [(0, False), (5, True)])
def test_labels_exact_with_llama2_tokenizer(tok, sp, sample, index, has_input) -> None:
    rec = sample[index]
    assert bool(rec.input) == has_input
    if has_input:
        prompt = f"{HEADER_INPUT}\n\n### Instruction:\n{rec.instruction}\n\n### Input:\n{rec.input}\n\n### Response:\n"
    else:
        prompt = f"{HEADER_NO_INPUT}\n\n### Instruction:\n{rec.instruction}\n\n### Response:\n"
    # Independent reference: SentencePiece on the joined text, plus bos/eos by hand.
    full = [sp.bos_id()] + sp.encode(prompt + rec.output) + [sp.eos_id()]
    n_prompt = 1 + len(sp.encode(prompt))

    ex = tokenize_record(rec, tok, max_seq_len=512)
    assert ex.input_ids == full
    assert ex.labels == [IGNORE_INDEX] * n_prompt + full[n_prompt:]
    assert not ex.truncated and ex.num_targets == len(full) - n_prompt
    target = ex.input_ids[n_prompt:]
    assert target[-1] == tok.eos_id and tok.eos_id not in target[:-1]
    assert tok.decode(target[:-1]) == rec.output
    assert sp.decode(target) == rec.output  # decode(target part) == output (+ eos, which decodes to "")


def test_every_training_record_matches_joint_tokenisation(tok, sp, sample) -> None:
    """Tokenising prompt and output separately never moves the boundary vs tokenising the joined text."""
    train, _ = split(sample)
    ds = AlpacaDataset(train, tok, max_seq_len=4096)
    assert len(ds) == 200 and ds.num_truncated == 0
    for rec, ex in zip(train, ds):
        prompt = format_prompt(rec)
        n_prompt = 1 + len(sp.encode(prompt))
        assert ex.input_ids == [1] + sp.encode(prompt + rec.output) + [2]
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in ex.labels[n_prompt:]
    assert ds.num_target_tokens == sum(ex.num_targets for ex in ds)


def test_tokenizers_json_gives_same_examples(tok, sample) -> None:
    hf = load_tokenizer(asset("llama2_tokenizer.json"))
    recs = sample[:60]
    a, b = AlpacaDataset(recs, tok), AlpacaDataset(recs, hf)
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.labels for e in a] == [e.labels for e in b]


def test_special_token_text_in_data_is_plain_text() -> None:
    hf = load_tokenizer(asset("llama2_tokenizer.json"))
    ex = tokenize_record({"instruction": "Say </s> twice", "output": "</s> </s>"}, hf)
    assert ex.input_ids.count(hf.eos_id) == 1 and ex.input_ids[-1] == hf.eos_id


def test_truncation(tok, sample) -> None:
    ds = AlpacaDataset(sample[:20], tok, max_seq_len=64)
    full = AlpacaDataset(sample[:20], tok, max_seq_len=4096)
    expected = sum(len(e.input_ids) > 64 for e in full)
    assert ds.num_truncated == expected > 0
    for short, long in zip(ds, full):
        assert len(short.input_ids) == len(short.labels) == min(64, len(long.input_ids))
        assert short.input_ids == long.input_ids[:64] and short.labels == long.labels[:64]
        assert short.truncated == (len(long.input_ids) > 64)
    tiny = AlpacaDataset(sample[:3], tok, max_seq_len=8)  # cut inside the prompt: nothing to learn
    assert tiny.num_no_target == 3 and tiny.num_target_tokens == 0


class CharTokenizer:
    """One id per character, no BOS: checks the add_bos=False path."""

    bos_id, eos_id, pad_id, add_bos = None, 0, 0, False

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_no_bos_tokenizer() -> None:
    rec = Record(instruction="hi", output="yo")
    ex = tokenize_record(rec, CharTokenizer())
    n = len(format_prompt(rec))
    assert ex.input_ids == [ord(c) for c in format_prompt(rec)] + [ord("y"), ord("o"), 0]
    assert ex.labels == [IGNORE_INDEX] * n + [ord("y"), ord("o"), 0]


# ------------------------------------------------------------------------------------ loading
GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}

BAD_CASES = [
    ("not an object", ["just a string"], "expected a JSON object"),
    ("missing instruction", [{"output": "x"}], "'instruction' is missing"),
    ("missing output", [{"instruction": "x"}], "'output' is missing"),
    ("non-string instruction", [{"instruction": 3, "output": "x"}], "'instruction' must be a string"),
    ("non-string output", [{"instruction": "x", "output": ["x"]}], "'output' must be a string"),
    ("non-string input", [{"instruction": "x", "input": 1, "output": "x"}], "'input' must be a string"),
    ("empty instruction", [{"instruction": "  ", "output": "x"}], "'instruction' is empty"),
]


@pytest.mark.parametrize("case,bad,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_bad_record_is_one_error_naming_file_and_index(tmp_path, case, bad, match, fmt) -> None:
    rows = [GOOD, GOOD, *bad, GOOD]
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_records(path)
    msg = str(info.value)
    assert str(path) in msg and "record 2" in msg
    if fmt == "jsonl":
        assert "line 3" in msg
    got = load_records(path, skip_bad=True)
    assert len(got) == 3 and got.skipped == 1 and got.indices == [0, 1, 3] and got.total == 4
    assert match in got.problems[0]


def test_malformed_json_names_position(tmp_path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 3 column"):
        load_records(p)
    q = tmp_path / "broken.jsonl"
    q.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": "a", "output": \n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: record 1 \(line 3\): invalid JSON"):
        load_records(q)
    got = load_records(q, skip_bad=True)
    assert len(got) == 2 and got.skipped == 1 and got.indices == [0, 2]


def test_empty_and_missing_sources(tmp_path) -> None:
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json: no records"):
        load_records(tmp_path / "empty.json")
    (tmp_path / "all_bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="no records.*1 bad records skipped"):
        load_records(tmp_path / "all_bad.jsonl", skip_bad=True)
    (tmp_path / "obj.json").write_text('[{"a": 1}')
    with pytest.raises(DataError, match="obj.json"):
        load_records(tmp_path / "obj.json")
    (tmp_path / "one.json").write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(DataError, match="one.json: one JSON object spanning several lines"):
        load_records(tmp_path / "one.json")
    (tmp_path / "one_line.json").write_text(json.dumps(GOOD))  # a single JSON-lines record is fine
    assert len(load_records(tmp_path / "one_line.json")) == 1
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.json")


def test_json_and_jsonl_load_the_same(tmp_path, sample) -> None:
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in sample[:30]]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(load_records(tmp_path / "a.json")) == list(load_records(tmp_path / "a.jsonl")) == sample[:30]


def test_bundled_sample(sample) -> None:
    raw = json.loads((ROOT / "solotune" / "data" / "alpaca_sample.json").read_text())
    assert len(raw) == sample.total == len(sample) == 500
    assert sample.skipped == 0 and sample.problems == []
    assert sample.empty_outputs == [i for i, r in enumerate(raw) if not r["output"].strip()] == [284]
    assert sum(bool(r.input) for r in sample) == sum(bool(r["input"]) for r in raw)


@pytest.mark.parametrize("empty", ["", "  \n"])
def test_empty_output_is_valid_and_trains_only_eos(tmp_path, tok, empty) -> None:
    """An empty answer (record 284 of the real Alpaca file) teaches "stop after the prompt": its one
    target is EOS, as in Stanford's train.py. Only structural problems are errors."""
    rows = [GOOD, {"instruction": "Standardize the date.", "input": "July 26th, 2021", "output": empty}, GOOD]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    recs = load_records(tmp_path / "d.json")
    assert len(recs) == 3 and recs.skipped == 0 and recs.empty_outputs == [1] and recs[1].output == ""
    ds = AlpacaDataset(recs, tok, max_seq_len=512)
    ex = ds[1]
    head = [tok.bos_id] + tok.encode(format_prompt(recs[1]))
    assert ex.input_ids == head + [tok.eos_id]
    assert ex.labels == [IGNORE_INDEX] * len(head) + [tok.eos_id] and ex.num_targets == 1
    b = collate(list(ds), pad_id=0)
    targets = b["labels"][1][b["labels"][1] != IGNORE_INDEX].tolist()
    assert targets == [tok.eos_id] and b["labels"][1, len(head)] == tok.eos_id  # padding after it is ignored
    assert int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) == ds.num_target_tokens  # the loop's target count


def test_skipped_records_leave_a_hole_in_the_split(tmp_path) -> None:
    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(6)]
    rows[2] = {"instruction": "x"}  # no output: dropped with skip_bad
    (tmp_path / "d.json").write_text(json.dumps(rows))
    train, val = split(load_records(tmp_path / "d.json", skip_bad=True), train=range(0, 4), val=range(4, 6))
    assert [r.instruction for r in train] == ["i0", "i1", "i3"] and [r.instruction for r in val] == ["i4", "i5"]


# ------------------------------------------------------------------------------- split / order
def test_default_split_uses_source_indices(sample) -> None:
    raw = json.loads((ROOT / "solotune" / "data" / "alpaca_sample.json").read_text())
    train, val = split(sample)
    assert len(train) == 200 and len(val) == 100
    assert train[0].instruction == raw[0]["instruction"] and train[-1].instruction == raw[199]["instruction"]
    assert val[0].instruction == raw[400]["instruction"] and val[-1].instruction == raw[499]["instruction"]
    with_284, _ = split(sample, train=range(280, 290), val=range(0, 1))  # 284 (empty output) is a record
    assert [r.instruction for r in with_284] == [raw[i]["instruction"] for i in range(280, 290)]
    with pytest.raises(ValueError, match="overlap"):
        split(sample, train=range(0, 10), val=range(5, 20))
    with pytest.raises(ValueError, match="outside"):
        split(sample, train=range(0, 10), val=range(450, 501))


def test_epoch_order_is_seeded_and_pure() -> None:
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = epoch_order(200, seed=0, epoch=0)
    assert sorted(a) == list(range(200)) and a != list(range(200))
    assert a == epoch_order(200, seed=0, epoch=0)
    assert a != epoch_order(200, seed=0, epoch=1) and a != epoch_order(200, seed=1, epoch=0)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert epoch_order(0, 0, 0) == []


def test_collate_right_pads() -> None:
    exs = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8]), Example([1, 2, 3, 4, 9], [-100, -100, 3, 4, 9])]
    b = collate(exs, pad_id=0)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long and b["attention_mask"].dtype == torch.bool
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 9]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [8, -100, -100, -100, -100], [-100, -100, 3, 4, 9]]
    assert b["attention_mask"].tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    assert collate(exs, pad_id=2, pad_to_multiple_of=8)["input_ids"].shape == (3, 8)
    with pytest.raises(ValueError):
        collate([], pad_id=0)


@pytest.mark.slow
def test_smollm2_bpe_boundary_matches_joint_tokenisation(smollm2_gguf, sample) -> None:
    """Same boundary property with a byte-level BPE vocab (SmolLM2, no BOS)."""
    bpe = load_tokenizer(smollm2_gguf)
    assert not bpe.add_bos
    for rec in sample:
        ex = tokenize_record(rec, bpe, max_seq_len=4096)
        prompt = bpe.encode(format_prompt(rec), allow_special=False)
        assert ex.input_ids == bpe.encode(format_prompt(rec) + rec.output, allow_special=False) + [bpe.eos_id]
        assert ex.labels == [IGNORE_INDEX] * len(prompt) + ex.input_ids[len(prompt):]
