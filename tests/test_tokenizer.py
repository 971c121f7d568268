"""Tokenizer tests: the two LLaMA-2 files agree with each other and with raw SentencePiece, GGUF
vocabularies (SentencePiece-style and GPT-2 byte-level) match their references, chat templates, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers

from solotune.tokenizer import Tokenizer, llama2_chat, load_tokenizer

ASSETS = Path(__file__).parent / "assets"


def alpaca_texts(records: list[dict[str, str]]) -> list[str]:
    """Each record as a full training text (prompt + response), the way fine-tuning sees it."""
    out = []
    for r in records:
        inp = f"### Input:\n{r['input']}\n\n" if r["input"].strip() else ""
        out.append(f"### Instruction:\n{r['instruction']}\n\n{inp}### Response:\n{r['output']}")
    return out


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (printable Latin-1 as itself, the rest from U+0100 on)."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return out


# ------------------------------------------------------------------------------- LLaMA-2 files
def test_llama2_backends_agree_on_alpaca(llama2_sp: Tokenizer, llama2_json: Tokenizer, alpaca_records) -> None:
    raw_sp = spm.SentencePieceProcessor(model_file=str(ASSETS / "llama2_tokenizer.model"))
    raw_json = tokenizers.Tokenizer.from_file(str(ASSETS / "llama2_tokenizer.json"))
    texts = alpaca_texts(alpaca_records)
    assert len(texts) == 500
    for k, text in enumerate(texts):
        ids = llama2_sp.encode(text, bos=True)
        assert ids == llama2_json.encode(text, bos=True), k
        assert ids == [1] + raw_sp.encode(text), k  # the reference: SentencePiece itself
        assert ids == raw_json.encode(text).ids, k  # tokenizers' post-processor adds the same BOS


def test_llama2_attributes(llama2_sp: Tokenizer, llama2_json: Tokenizer) -> None:
    for tok in (llama2_sp, llama2_json):
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 32000)  # no pad: eos
        assert tok.add_bos and tok.stop_ids == {2} and tok.chat_template is None
        assert tok.special_ids == {0, 1, 2}
        assert tok.encode("Hello world") == [15043, 3186]  # SOURCES.md
        assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
        assert tok.token_to_id("<s>") == 1 and tok.id_to_token(2) == "</s>" and tok.token_to_id("no-such") is None


def test_llama2_roundtrip(llama2_sp: Tokenizer, llama2_json: Tokenizer, alpaca_records) -> None:
    for text in alpaca_texts(alpaca_records)[:100] + ["héllo 😀 wörld\n\n\tx", "Ω≈ç√ 12345"]:
        for tok in (llama2_sp, llama2_json):
            assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_literal_special_strings(llama2_sp: Tokenizer, llama2_json: Tokenizer) -> None:
    raw = spm.SentencePieceProcessor(model_file=str(ASSETS / "llama2_tokenizer.model"))
    text = "Hello <s> world</s>"
    for tok in (llama2_sp, llama2_json):
        # parsed: each text stretch is encoded on its own (SentencePiece dummy prefix included)
        assert tok.encode(text) == raw.encode("Hello ") + [1] + raw.encode(" world") + [2]
        # not parsed: plain characters, exactly as SentencePiece sees them
        assert tok.encode(text, allow_special=False) == raw.encode(text)
        assert 1 not in tok.encode(text, allow_special=False)
        assert tok.decode(tok.encode("<s>Hi</s>"), skip_special=False) == "<s>Hi</s>"
        assert tok.decode([1, 15043, 2]) == "Hello"
        with pytest.raises(ValueError, match="outside the vocab"):
            tok.decode([32000])


def test_llama2_chat_matches_meta_encoding(llama2_sp: Tokenizer, llama2_json: Tokenizer) -> None:
    raw = spm.SentencePieceProcessor(model_file=str(ASSETS / "llama2_tokenizer.model"))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
              {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "Name a colour."}]
    text = llama2_sp.apply_chat(dialog)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
                    "<s>[INST] Name a colour. [/INST]")
    # Meta's reference chat code encodes every exchange on its own, with bos/eos around it
    want = ([1] + raw.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! ") + [2]
            + [1] + raw.encode("[INST] Name a colour. [/INST]"))
    assert llama2_sp.encode(text) == want == llama2_json.encode(llama2_json.apply_chat(dialog))
    with pytest.raises(ValueError, match="alternating"):
        llama2_chat([{"role": "assistant", "content": "x"}])


# --------------------------------------------------------------------------- GGUF "llama" vocab
def test_gguf_llama_vocab_matches_sentencepiece(llama2_sp: Tokenizer, alpaca_records) -> None:
    """A GGUF-style pieces+scores vocab, built from the SentencePiece model, encodes like it."""
    sp = llama2_sp.backend.sp
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (1, 2, 2, True, 32000)
    for k, text in enumerate(alpaca_texts(alpaca_records) + ["héllo 😀 <s>x</s>\n\n\t 12345 ƺ"]):
        assert tok.encode(text) == llama2_sp.encode(text), k
    assert tok.decode(tok.encode("héllo 😀 wörld  x")) == "héllo 😀 wörld  x"  # byte fallback round trip


# ---------------------------------------------------------------------------- GGUF "gpt2" vocab
def tiny_gpt2_meta(pre: str = "smollm") -> dict:
    """A small byte-level BPE vocab in GGUF form: 3 control tokens, the 256 byte symbols, some merges."""
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "Ċ Ċ", "Ġ Ġ", "i m", "u s", "us e", "use r"]
    merged = ["Ġt", "he", "Ġthe", "12", "ĊĊ", "ĠĠ", "im", "us", "use", "user"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars() + merged
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}


def test_gguf_gpt2_synthetic() -> None:
    meta = tiny_gpt2_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.stop_ids == {0, 2}  # EOS (<|im_end|>) and <|endoftext|>
    assert tok.encode(" the") == [ids["Ġthe"]]
    assert tok.encode("12") == [ids["1"], ids["2"]]  # digits one at a time although "1 2" is a merge
    assert tok.encode("a\n\nb") == [ids["a"], ids["Ċ"], ids["Ċ"], ids["b"]]  # GPT-2 regex: last space joins the word
    assert tok.encode("a\n\n1") == [ids["a"], ids["ĊĊ"], ids["1"]]  # ... but the digit is split off first
    assert tok.encode("<|im_start|>user\n") == [1, ids["user"], ids["Ċ"]]
    plain = tok.encode("<|im_start|>", allow_special=False)
    assert plain[:3] == [ids["<"], ids["|"], ids["im"]] and tok.decode(plain) == "<|im_start|>"
    for text in ["héllo 😀 12\n\n the  user", " leading", "trailing  "]:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode(chat)) == "user\nhi\nassistant\n"
    assert tok.decode(tok.encode(chat), skip_special=False) == chat
    # plain GPT-2 pre-tokenizer: "12" merges
    assert Tokenizer.from_gguf_metadata(tiny_gpt2_meta("gpt-2")).encode("12") == [ids["12"]]


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.model", "bert", "tokenizer.ggml.model"),
    ("tokenizer.ggml.pre", "qwen2", "tokenizer.ggml.pre"),
    ("tokenizer.ggml.merges", ["a b c"], r"tokenizer.ggml.merges\[0\]"),
    ("tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens"),
    ("tokenizer.ggml.eos_token_id", 10**6, "eos_id"),
])
def test_gguf_errors(key: str, value, match: str) -> None:
    meta = tiny_gpt2_meta()
    meta[key] = value
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_gguf_metadata(meta)


# ------------------------------------------------------------------- directories and templates
def test_directory_with_config_and_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((ASSETS / "llama2_tokenizer.json").read_bytes())
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
                "{{ bos_token }}<{{ m['role'] }}> {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ bos_token }}<assistant>{% endif %}")
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": "<unk>", "add_bos_token": False,
           "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.chat_template) == (1, 2, 0, False, template)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat(msgs) == "<s><user> Hi</s>\n<s><assistant>"
    assert tok.apply_chat(msgs, add_generation_prompt=False) == "<s><user> Hi</s>\n"
    with pytest.raises(ValueError, match="no system"):
        tok.apply_chat([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="chat message 0"):
        tok.apply_chat([{"role": "user"}])


def test_template_is_sandboxed(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((ASSETS / "llama2_tokenizer.json").read_bytes())
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": evil}))
    with pytest.raises(ValueError, match="chat_template failed"):
        load_tokenizer(tmp_path).apply_chat([{"role": "user", "content": "x"}])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no-such-file.model"):
        load_tokenizer(tmp_path / "no-such-file.model")
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="x.gguf"):
        load_tokenizer(tmp_path / "x.gguf")


# ----------------------------------------------------------------------- the real SmolLM2 vocab
def reference_smollm_bpe(meta: dict):
    """An independent re-implementation of llama.cpp's tokenizer for ``pre == "smollm"``: isolate
    every \\p{N} character, split each stretch with GPT-2's regex, map bytes to GPT-2's symbols, then
    apply the merges lowest rank first."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    digit = regex.compile(r"\p{N}")
    sym = byte_chars()
    rank = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    cache: dict[str, list[int]] = {}

    def bpe(word: str) -> list[int]:
        if word not in cache:
            parts = [sym[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(rank.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
                best, k = min(pairs)
                if best == 1 << 30:
                    break
                parts[k:k + 2] = [parts[k] + parts[k + 1]]
            cache[word] = [vocab[p] for p in parts]
        return cache[word]

    def encode(text: str) -> list[int]:
        ids, pos = [], 0
        stretches = []
        for m in digit.finditer(text):
            stretches += [text[pos:m.start()], m.group()]
            pos = m.end()
        stretches.append(text[pos:])
        for s in stretches:
            for w in gpt2.findall(s):
                ids += bpe(w)
        return ids

    return encode


@pytest.mark.slow
def test_smollm2_gguf_tokenizer(smollm2_gguf: Path, alpaca_records) -> None:
    import gguf

    from solotune.checkpoint.gguf import read_metadata

    meta = read_metadata(gguf.GGUFReader(str(smollm2_gguf)))
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.vocab_size == 49152 and tok.add_bos is False
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.eos_id == 2 and tok.stop_ids == {0, 2} and tok.pad_id == 2  # <|im_end|>, <|endoftext|>
    digits = tok.encode("In 2024 we sold 1234567 units")
    assert [tok.id_to_token(i) for i in digits if tok.id_to_token(i).isdigit()] == list("20241234567")
    for word in [" the", " information", " because", " Hello", " world", " language", "The"]:
        assert len(tok.encode(word)) == 1, word
    reference = reference_smollm_bpe(meta)
    for k, text in enumerate(alpaca_texts(alpaca_records)):
        ids = tok.encode(text)
        assert ids == reference(text), k
        assert tok.decode(ids) == text, k
    chat = tok.apply_chat([{"role": "user", "content": "What is 2+2?"}])
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(chat)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert load_tokenizer(smollm2_gguf).encode(chat) == ids


def test_special_text_in(llama2_sp: Tokenizer, llama2_json: Tokenizer) -> None:
    """What conversation data checks before a chat rendering would turn text into control tokens."""
    for tok in (llama2_sp, llama2_json):
        assert tok.special_text_in("plain text, <s >, </ s>") is None
        assert tok.special_text_in("an answer</s> and more") == "</s>"
        assert tok.special_text_in("<unk> first, then <s>") == "<unk>"
