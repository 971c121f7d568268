"""Conversation data: messages / ShareGPT validation, the alpaca|chat|auto choice, and chat-template
label masking checked token for token against an independent rendering (jinja2 + HF `tokenizers`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from solotune.data import IGNORE_INDEX, Conversation, DataError, Record, Turn, load_records, tokenize_record
from solotune.data.conversations import (
    as_alpaca,
    as_conversation,
    check_template,
    resolve_template,
    tokenize_conversation,
    tokenize_example,
    tokenized,
)
from solotune.hub import solotune_home
from solotune.tokenizer import load_tokenizer

THREE_TURNS = [
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another one?"},
    {"role": "assistant", "content": "Blue is one too."},
    {"role": "user", "content": "Which is warmer?\n\nAnswer in a word."},
    {"role": "assistant", "content": " Red, by the usual convention.\n"},
]
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def sharegpt(messages: list[dict[str, str]]) -> dict:
    return {"id": "x1", "conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def label_spans(ex, tok) -> list[str]:
    """The labelled stretches of ``ex`` decoded with special tokens shown."""
    spans, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == i  # labels are the tokens themselves (the loss shifts)
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur, skip_special=False))
            cur = []
    if cur:
        spans.append(tok.decode(cur, skip_special=False))
    return spans


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def llama2_tok():
    return load_tokenizer(Path(__file__).resolve().parents[1] / "assets" / "llama2_tokenizer.model")


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf) -> tuple:
    """SmolLM2's tokenizer and chat template as *transformers* converts them from the GGUF (not our
    converter), saved once under $SOLOTUNE_HOME (the conversion takes ~30 s on a busy CPU; later runs
    read the saved tokenizer.json in well under a second). Returns (tokenizers.Tokenizer, template)."""
    tokenizers = pytest.importorskip("tokenizers")
    cache = solotune_home() / "test-reference" / "smollm2-135m-instruct-hf-tokenizer"
    if not (cache / "tokenizer.json").is_file():
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "chat_template.jinja").write_text(hf.chat_template, encoding="utf-8")
        try:
            tmp.rename(cache)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    tok = tokenizers.Tokenizer.from_file(str(cache / "tokenizer.json"))
    return tok, (cache / "chat_template.jinja").read_text(encoding="utf-8")


def reference_render(template: str, messages: list[dict[str, str]]) -> str:
    """The template rendered with plain jinja2, the way HF's apply_chat_template sets it up."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=False)


# ------------------------------------------------------------------------ SmolLM2's chat template
def test_three_turn_labels_match_reference_tokens(smollm2_tok, hf_reference) -> None:
    """ids == jinja2 rendering tokenised by HF `tokenizers` (transformers' own GGUF conversion), and
    the labels are exactly the tokens inside each assistant turn's ``content<|im_end|>`` span,
    located in the reference rendering by character offsets."""
    ref_tok, template = hf_reference
    conv = load_conv(THREE_TURNS)
    ex = tokenize_conversation(conv, smollm2_tok, max_seq_len=512)
    text = reference_render(template, conv.messages)
    enc = ref_tok.encode(text, add_special_tokens=False)
    assert ex.input_ids == enc.ids and not ex.truncated
    spans, cursor = [], 0
    for m in conv.messages:
        if m["role"] == "assistant":
            head = "<|im_start|>assistant\n"
            start = text.index(head + m["content"] + "<|im_end|>", cursor) + len(head)
            cursor = start + len(m["content"]) + len("<|im_end|>")
            spans.append((start, cursor))
    want = [tid if any(a <= lo and hi <= b for a, b in spans) else IGNORE_INDEX
            for tid, (lo, hi) in zip(enc.ids, enc.offsets)]
    assert ex.labels == want
    assert label_spans(ex, smollm2_tok) == [m["content"] + "<|im_end|>" for m in conv.messages
                                            if m["role"] == "assistant"]
    assert sum(lab == smollm2_tok.eos_id for lab in ex.labels) == 3  # each answer ends with EOS (<|im_end|>)


def load_conv(messages: list[dict[str, str]], where: str = "test: record 0") -> Conversation:
    from solotune.data.conversations import check_conversation

    return check_conversation({"messages": messages}, where)


def test_sharegpt_equals_messages(tmp_path, smollm2_tok) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, *THREE_TURNS]
    a = load_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))[0]
    b = load_records(write_jsonl(tmp_path / "s.jsonl", [sharegpt(msgs)]))[0]
    assert isinstance(a, Conversation) and a == b
    assert tokenize_conversation(a, smollm2_tok) == tokenize_conversation(b, smollm2_tok)


def test_system_turn(smollm2_tok) -> None:
    """An explicit system turn replaces the template's default one; system text is never a label."""
    with_sys = tokenize_conversation(load_conv([{"role": "system", "content": "Be brief."}, *THREE_TURNS[:2]]),
                                     smollm2_tok)
    without = tokenize_conversation(load_conv(THREE_TURNS[:2]), smollm2_tok)
    text = smollm2_tok.decode(with_sys.input_ids, skip_special=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in text
    assert "named SmolLM" in smollm2_tok.decode(without.input_ids)
    assert label_spans(with_sys, smollm2_tok) == label_spans(without, smollm2_tok) == ["Red.<|im_end|>"]


def test_no_template_falls_back_to_llama2_format(llama2_tok) -> None:
    """No chat template (LLaMA-2's tokenizer): the [INST] format, system folded into the first user
    turn, each answer labelled through its </s> (EOS)."""
    conv = load_conv([{"role": "system", "content": "Be brief."}, *THREE_TURNS[:4]])
    ex = tokenize_conversation(conv, llama2_tok)
    assert ex.input_ids == llama2_tok.encode(llama2_tok.apply_chat(conv.messages))  # BOS from the format's <s>
    assert ex.input_ids.count(llama2_tok.bos_id) == 2 and ex.input_ids[0] == llama2_tok.bos_id
    assert [s.strip() for s in label_spans(ex, llama2_tok)] == ["Red. </s>", "Blue is one too. </s>"]
    assert all(ex.labels[i] == llama2_tok.eos_id for i in range(len(ex.labels))
               if ex.labels[i] != IGNORE_INDEX and (i + 1 == len(ex.labels) or ex.labels[i + 1] == IGNORE_INDEX))


def test_empty_answer_trains_only_end_of_turn(smollm2_tok) -> None:
    conv = load_conv([{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "  "}])
    assert conv.empty_target and conv.turns[1].content == ""
    ex = tokenize_conversation(conv, smollm2_tok)
    assert [lab for lab in ex.labels if lab != IGNORE_INDEX] == [smollm2_tok.eos_id]


def test_truncation_cuts_the_end(smollm2_tok) -> None:
    full = tokenize_conversation(load_conv(THREE_TURNS), smollm2_tok)
    cut = tokenize_conversation(load_conv(THREE_TURNS), smollm2_tok, max_seq_len=len(full.input_ids) - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]


# --------------------------------------------------------------------------------- templates
def test_auto_alpaca_and_chat_choices(smollm2_tok, llama2_tok) -> None:
    rec = Record(instruction="Add the numbers.", input="2 and 3", output="5")
    conv = load_conv(THREE_TURNS[:2])
    assert resolve_template("auto", rec, smollm2_tok) == "alpaca"  # Alpaca records keep the Alpaca prompt
    assert resolve_template("auto", conv, smollm2_tok) == "chat"  # the instruct model's own template
    assert resolve_template("auto", conv, llama2_tok) == "alpaca"  # a tokenizer without a chat template
    assert resolve_template("chat", rec, llama2_tok) == "chat"
    # auto on Alpaca records is exactly the Alpaca pipeline (earlier runs stay the same)
    assert tokenize_example(rec, smollm2_tok, 512, "auto") == tokenize_record(rec, smollm2_tok, 512)
    # a single exchange through the Alpaca prompt == the same Alpaca record
    one = load_conv([{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}])
    assert tokenize_example(one, llama2_tok, 512, "auto") == tokenize_record(
        Record(instruction="Add 2 and 3.", output="5"), llama2_tok, 512)
    # an Alpaca record through the chat template: instruction + input as the user turn
    chat = tokenize_example(rec, smollm2_tok, 512, "chat")
    assert "Add the numbers.\n\n2 and 3<|im_end|>" in smollm2_tok.decode(chat.input_ids, skip_special=False)
    assert label_spans(chat, smollm2_tok) == ["5<|im_end|>"]
    assert as_alpaca(as_conversation(Record(instruction="a", output="b"))) == Record(instruction="a", output="b")


def test_alpaca_template_rejects_what_it_cannot_hold(tmp_path) -> None:
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "x", "output": "y"}, {"messages": THREE_TURNS}]))
    with pytest.raises(DataError, match=r"d\.jsonl: record 1 \(line 2\): has 3 assistant turns.*--template chat"):
        check_template(recs, "alpaca")
    check_template(recs, "auto")
    check_template(recs, "chat")
    sys_conv = load_conv([{"role": "system", "content": "s"}, *THREE_TURNS[:2]])
    with pytest.raises(DataError, match="has a system turn"):
        as_alpaca(sys_conv)


def test_mixed_file_and_dataset(tmp_path, smollm2_tok) -> None:
    recs = load_records(write_jsonl(tmp_path / "mix.jsonl", [
        {"instruction": "Say hi.", "output": "hi"}, {"messages": THREE_TURNS}, sharegpt(THREE_TURNS[:2]),
        {"messages": [{"role": "user", "content": "Nothing?"}, {"role": "assistant", "content": ""}]}]))
    assert [type(r).__name__ for r in recs] == ["Record", "Conversation", "Conversation", "Conversation"]
    assert recs.empty_outputs == [3]
    ds = tokenized(recs, smollm2_tok, 512, "auto")
    assert ds[0] == tokenize_record(recs[0], smollm2_tok, 512) and ds[1] == tokenize_conversation(recs[1], smollm2_tok)


def test_special_token_text_in_content_is_refused(smollm2_tok) -> None:
    conv = load_conv([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye<|im_end|>more"}],
                     where="f.jsonl: record 7 (line 8)")
    with pytest.raises(DataError, match=r"f\.jsonl: record 7 \(line 8\): turn 1 \(assistant\).*'<\|im_end\|>'"):
        tokenize_conversation(conv, smollm2_tok)


def test_template_without_end_of_turn_is_refused(smollm2_tok) -> None:
    import copy

    tok = copy.copy(smollm2_tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    tok.__dict__.pop("_compiled_template", None)
    with pytest.raises(DataError, match="without an end-of-turn token"):
        tokenize_conversation(load_conv(THREE_TURNS[:2]), tok)


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("record, message", [
    ({"messages": []}, r"record 0 \(line 1\): field 'messages' must be a non-empty list"),
    ({"messages": "hi"}, r"field 'messages' must be a non-empty list of turns, got str"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]\.content is missing"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role 'bot' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content must be a string, got int"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"messages\[0\]\.role is 'assistant': expected user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
     r"messages\[1\]\.role is 'user': expected assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"messages\[0\] is the last turn and a user turn"),
    ({"messages": [{"role": "system", "content": "s"}]}, r"messages: has no user turn"),
    ({"messages": [*THREE_TURNS[:2], {"role": "system", "content": "s"}]}, r"only the first turn may be system"),
    ({"messages": [{"role": "user", "content": " "}, THREE_TURNS[1]]}, r"messages\[0\]\.content is empty"),
    ({"messages": THREE_TURNS, "conversations": []}, r"has both 'messages' and 'conversations'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"conversations\[0\]\.from 'robot' is not one of"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\]\.value is missing"),
    ({"chat": []}, r"field 'instruction' is missing \(a record is Alpaca .*messages.*conversations"),
])
def test_bad_records_name_file_record_and_field(tmp_path, record, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}: record 0 (line 1)") and "\n" not in str(err.value)


def test_skip_bad_conversations(tmp_path) -> None:
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", [{"messages": THREE_TURNS}, {"messages": []},
                                                           sharegpt(THREE_TURNS)]), skip_bad=True)
    assert len(recs) == 2 and recs.skipped == 1 and recs.indices == [0, 2]
    assert recs[0].turns[0] == Turn("user", "Name a primary color.")
