"""Tokenizers: SentencePiece ``tokenizer.model``, HF ``tokenizer.json``, and the vocab embedded in GGUF.

One :class:`Tokenizer` front end over two backends (a SentencePiece processor, or a ``tokenizers``
object). The front end owns everything that must behave the same whatever the backend:

* **Special tokens in text.** ``encode(text)`` matches the exact strings of the special tokens
  (SentencePiece control/unknown pieces such as ``<s>``/``</s>``/``<unk>``; ``tokenizers`` added
  tokens marked special; GGUF control tokens such as ``<|im_start|>``) and maps each to its single
  id. The text between them is encoded as if it were a string of its own, so SentencePiece-style
  vocabularies put their dummy-prefix ``▁`` in front of every such piece, as Meta's reference code
  does when it encodes chat turns one by one. A literal ``"<s>"`` therefore becomes BOS (id 1)
  with *both* LLaMA-2 backends. Pass ``allow_special=False`` to encode untrusted text: special
  strings are then split into ordinary pieces by every backend (``"<s>"`` -> ``▁<``, ``s``, ``>``).
* **BOS/EOS** are added only when asked (``bos=True``/``eos=True``), never by a backend's
  post-processor (the LLaMA-2 ``tokenizer.json`` would add ``<s>`` on its own).
* **Decoding** skips the special ids (``skip_special=True``) or renders them as their strings.
* **Chat templates** are rendered with jinja2's sandboxed environment; without a template the
  LLaMA-2 ``[INST] ... [/INST]`` format is used.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from .errors import MissingPathError, TokenizerError


class TokenizerNotFound(MissingPathError, TokenizerError):
    """No tokenizer file where one was named: a FileNotFoundError, and a ValueError as it always was."""

# End-of-turn / end-of-text tokens that stop generation besides EOS when the vocab has them as
# special tokens (an instruct model whose EOS is <|im_end|> may still end a document with <|endoftext|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
                      "<|endoftext|>", "<|end_of_text|>")

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

# GGUF tokenizer.ggml.pre values whose pre-tokenizer is "isolate every digit, then GPT-2's regex"
# on each stretch between them, and those that use GPT-2's regex alone (llama.cpp groups them so).
_GGUF_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GGUF_PRE_GPT2 = {"gpt-2", "gpt2", "mpt", "olmo", "jais"}


class _Backend(Protocol):
    """Plain text <-> ids, with no special-token parsing and no BOS/EOS."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_to_piece(self, i: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...


class _SentencePieceBackend:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # SentencePiece never parses control pieces out of text

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # piece_to_id answers unk_id for unknown pieces: only trust it when it round-trips
        return i if self.sp.id_to_piece(i) == piece else None


class _HFBackend:
    def __init__(self, tok: Any) -> None:
        if not hasattr(tok, "encode_special_tokens"):
            raise TokenizerError("the installed `tokenizers` is too old (needs Tokenizer.encode_special_tokens, >= 0.15)")
        # Special tokens are parsed by the front end, uniformly across backends: here they are text.
        tok.encode_special_tokens = True
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # id_to_token reports a "normalized" added token in normalized form ('▁<s>'): keep the text
        self.added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self.added.get(i)
        return piece if piece is not None else self.tok.id_to_token(i)

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


class Tokenizer:
    """Text <-> token ids for one model, plus what generation and chat need.

    Attributes: ``bos_id`` (None when the vocab has no BOS), ``eos_id``, ``pad_id`` (EOS when the
    vocab has no pad), ``vocab_size``, ``stop_ids`` (EOS plus end-of-turn tokens such as
    ``<|im_end|>``), ``special_ids`` (ids that ``decode`` skips), ``add_bos`` (whether this model's
    prompts start with BOS), ``chat_template`` (jinja source or None).
    """

    def __init__(self, backend: _Backend, *, eos_id: int, bos_id: int | None, pad_id: int | None = None,
                 special_ids: Sequence[int] = (), add_bos: bool = False, chat_template: str | None = None,
                 stop_ids: Sequence[int] | None = None, source: str = "") -> None:
        self.backend = backend
        self.source = source
        self.vocab_size = backend.vocab_size
        for field, i in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{source}: {field} {i} is outside the vocab (size {self.vocab_size})")
        self.eos_id = int(eos_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        specials = {int(i) for i in special_ids} | {self.eos_id} | ({self.bos_id} if self.bos_id is not None else set())
        self.special_ids = frozenset(specials)
        if stop_ids is None:
            stop = {self.eos_id}
            for s in END_OF_TURN_TOKENS:
                i = backend.piece_to_id(s)
                if i is not None and i in self.special_ids:
                    stop.add(i)
        else:
            stop = {self.eos_id, *map(int, stop_ids)}
        self.stop_ids = frozenset(stop)
        # Longest first so that a special token that is a prefix of another never wins.
        self._special_by_text = {backend.id_to_piece(i): i for i in sorted(self.special_ids)}
        alternatives = sorted(self._special_by_text, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos})")

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_piece(self.eos_id)

    def token_to_id(self, piece: str) -> int | None:
        """Id of one vocab entry (exact piece string, e.g. ``"<|im_end|>"``), or None."""
        return self.backend.piece_to_id(piece)

    def id_to_token(self, i: int) -> str:
        return self.backend.id_to_piece(int(i))

    # ------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False, *, allow_special: bool = True) -> list[int]:
        """``text`` -> ids. ``bos``/``eos`` add those ids; special-token strings in the text become
        their ids unless ``allow_special=False`` (see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: this vocab has no BOS token")
            ids.append(self.bos_id)
        if allow_special and self._special_re is not None:
            for k, part in enumerate(self._special_re.split(text)):
                if k % 2:  # odd items are the captured special strings
                    ids.append(self._special_by_text[part])
                elif part:
                    ids.extend(self.backend.encode(part))
        elif text:
            ids.extend(self.backend.encode(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """ids -> text; special ids are dropped, or written as their strings with ``skip_special=False``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.source}: token id {bad[0]} is outside the vocab (size {self.vocab_size})")
        if skip_special:
            return self.backend.decode([i for i in ids if i not in self.special_ids])
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self.backend.decode(run))
                    run = []
                out.append(self.backend.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.backend.decode(run))
        return "".join(out)

    # ------------------------------------------------------------------------------------ chat
    def special_text_in(self, text: str) -> str | None:
        """The first special-token string (``"<|im_end|>"``, ``"</s>"``...) found in ``text``, or None.

        Why: a chat prompt is rendered to one string and encoded with special tokens parsed, so data
        text holding such a string would turn into a control token (a fake end of turn)."""
        m = self._special_re.search(text) if self._special_re is not None else None
        return m.group(0) if m else None

    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        # trim_blocks/lstrip_blocks: the settings HF chat templates are written for
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise TokenizerError(f"{self.source}: chat_template does not compile: {e}") from None

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) as one prompt string (special tokens
        as text; ``encode`` turns them into ids). Without a chat template: LLaMA-2's format."""
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {k}: expected {{'role': str, 'content': str}}, got {m!r}")
        if self.chat_template is None:
            return llama2_chat(messages, bos=self.bos_token or "", eos=self.eos_token)
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled_template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                  bos_token=self.bos_token or "", eos_token=self.eos_token)
        except TemplateError as e:
            raise TokenizerError(f"{self.source}: chat_template failed: {e}") from None

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "gguf") -> "Tokenizer":
        """Build from the ``tokenizer.*`` key/values of a GGUF file (``tokenizer.ggml.model`` "gpt2":
        byte-level BPE; "llama": SentencePiece-style BPE with byte fallback)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens list")
        types = list(meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        if model == "gpt2":
            tok = _gguf_gpt2(meta, tokens, types, source)
            default_add_bos = False
        elif model == "llama":
            tok = _gguf_llama(meta, tokens, types, source)
            default_add_bos = True
        else:
            raise TokenizerError(f"{source}: unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")
        specials = [i for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_UNKNOWN)]
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.eos_token_id")
        return cls(_HFBackend(tok), eos_id=int(eos), bos_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
                   pad_id=_opt_int(meta.get("tokenizer.ggml.padding_token_id")), special_ids=specials,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                   chat_template=meta.get("tokenizer.chat_template"), source=source)


# ----------------------------------------------------------------------------------- chat formats
def llama2_chat(messages: Sequence[Mapping[str, str]], bos: str = "<s>", eos: str = "</s>") -> str:
    """LLaMA-2-chat's format: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``
    per exchange; the prompt ends after the last ``[/INST]`` (the model's turn)."""
    msgs = list(messages)
    system = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    out = []
    for k, m in enumerate(msgs):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"chat message {k}: LLaMA-2 format needs user/assistant turns alternating "
                             f"(after an optional system message); got role {m['role']!r}")
        text = m["content"].strip()
        if want == "user":
            if k == 0 and system is not None:
                text = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{text}"
            out.append(f"{bos}[INST] {text} [/INST]")
        else:
            out.append(f" {text} {eos}")
    return "".join(out)


# -------------------------------------------------------------------------------------- loading
def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.model`` (SentencePiece), ``tokenizer.json`` (HF ``tokenizers``), a ``.gguf``
    file's embedded vocab, or a directory holding one of the first two. A ``tokenizer_config.json``
    beside it supplies the chat template, special tokens and ``add_bos_token``."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise TokenizerNotFound(f"{p}: directory has no tokenizer.json or tokenizer.model")
    if not p.is_file():
        raise TokenizerNotFound(f"{p}: no such tokenizer file")
    if p.suffix == ".gguf":
        from .checkpoint.gguf import read_metadata
        import gguf

        try:
            meta = read_metadata(gguf.GGUFReader(str(p)))
        except Exception as e:  # truncated or not a GGUF file
            raise TokenizerError(f"{p}: cannot read GGUF metadata: {e}") from None
        return Tokenizer.from_gguf_metadata(meta, source=str(p))
    config = _read_config(p.parent / "tokenizer_config.json")
    if p.suffix == ".model":
        return _load_sentencepiece(p, config)
    if p.suffix == ".json":
        return _load_tokenizers_json(p, config)
    raise TokenizerError(f"{p}: unknown tokenizer type (expected tokenizer.model, tokenizer.json, .gguf or a directory)")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return cfg


def _config_token(cfg: Mapping[str, Any], key: str) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    v = cfg.get(key)
    if isinstance(v, Mapping):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _config_template(cfg: Mapping[str, Any], path: Path) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, Mapping)}
        t = named.get("default")
    if t is not None and not isinstance(t, str):
        raise TokenizerError(f"{path.parent / 'tokenizer_config.json'}: chat_template must be a string")
    if t is None and (path.parent / "chat_template.jinja").is_file():  # newer HF layout
        t = (path.parent / "chat_template.jinja").read_text(encoding="utf-8")
    return t


def _config_id(backend: _Backend, cfg: Mapping[str, Any], key: str, path: Path) -> int | None:
    s = _config_token(cfg, key)
    if s is None:
        return None
    i = backend.piece_to_id(s)
    if i is None:
        raise TokenizerError(f"{path.parent / 'tokenizer_config.json'}: {key} {s!r} is not in the vocab")
    return i


def _load_sentencepiece(path: Path, cfg: Mapping[str, Any]) -> Tokenizer:
    try:
        backend = _SentencePieceBackend(path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad proto
        raise TokenizerError(f"{path}: not a SentencePiece model: {e}") from None
    sp = backend.sp
    specials = [i for i in range(backend.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
    bos = _config_id(backend, cfg, "bos_token", path)
    eos = _config_id(backend, cfg, "eos_token", path)
    pad = _config_id(backend, cfg, "pad_token", path)
    bos = bos if bos is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
    eos = eos if eos is not None else sp.eos_id()
    if eos < 0:
        raise TokenizerError(f"{path}: SentencePiece model has no eos piece")
    pad = pad if pad is not None else (sp.pad_id() if sp.pad_id() >= 0 else None)
    return Tokenizer(backend, eos_id=eos, bos_id=bos, pad_id=pad, special_ids=specials,
                     add_bos=bool(cfg.get("add_bos_token", bos is not None)),
                     chat_template=_config_template(cfg, path), source=str(path))


def _load_tokenizers_json(path: Path, cfg: Mapping[str, Any]) -> Tokenizer:
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path}: not a `tokenizers` tokenizer.json: {e}") from None
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    specials = [i for i, t in added.items() if t.special]
    # BOS a post-processor adds is the model's BOS; ask before the backend switches parsing off.
    probe = tok.encode("a", add_special_tokens=True).ids
    auto_bos = probe[0] if len(probe) > 1 and probe[0] in added else None
    backend = _HFBackend(tok)
    bos = _config_id(backend, cfg, "bos_token", path)
    eos = _config_id(backend, cfg, "eos_token", path)
    pad = _config_id(backend, cfg, "pad_token", path)
    by_text = {t.content: i for i, t in added.items()}
    if bos is None:
        bos = auto_bos if auto_bos is not None else _first_present(by_text, ("<s>", "<|begin_of_text|>", "<bos>"))
    if eos is None:
        eos = _first_present(by_text, ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"))
    if eos is None:
        raise TokenizerError(f"{path}: cannot tell the eos token (no tokenizer_config.json eos_token, no </s> or "
                         "<|endoftext|> added token)")
    if pad is None:
        pad = _first_present(by_text, ("<pad>", "<|pad|>"))
    add_bos = cfg.get("add_bos_token", auto_bos is not None)
    return Tokenizer(backend, eos_id=eos, bos_id=bos, pad_id=pad, special_ids=specials, add_bos=bool(add_bos),
                     chat_template=_config_template(cfg, path), source=str(path))


def _first_present(by_text: Mapping[str, int], names: Sequence[str]) -> int | None:
    return next((by_text[n] for n in names if n in by_text), None)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


# --------------------------------------------------------------------------------- GGUF vocabs
def _added_tokens(tokens: Sequence[str], types: Sequence[int]) -> tuple[list[Any], list[Any]]:
    """AddedTokens for control/unknown (special) and user-defined (ordinary) GGUF tokens."""
    from tokenizers import AddedToken

    special, normal = [], []
    for tok, t in zip(tokens, types):
        if t in (GGUF_CONTROL, GGUF_UNKNOWN):
            special.append(AddedToken(tok, special=True, normalized=False))
        elif t == GGUF_USER_DEFINED:
            normal.append(AddedToken(tok, special=False, normalized=False))
    return special, normal


def _gguf_gpt2(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int], source: str) -> Any:
    """GPT-2 byte-level BPE from tokens + merges, with the pre-tokenizer ``tokenizer.ggml.pre`` names."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise TokenizerError(f"{source}: GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    merges = []
    for k, m in enumerate(merges_raw):
        pair = m.split(" ")
        if len(pair) != 2:  # byte-level pieces never hold a raw space (it is mapped to 'Ġ')
            raise TokenizerError(f"{source}: tokenizer.ggml.merges[{k}] = {m!r} is not two pieces")
        merges.append((pair[0], pair[1]))
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GGUF_PRE_DIGITS_THEN_GPT2:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GGUF_PRE_GPT2:
        pre_tok = byte_level
    else:
        raise TokenizerError(f"{source}: unsupported tokenizer.ggml.pre {pre!r} for a gpt2 vocab "
                         f"(supported: {sorted(_GGUF_PRE_DIGITS_THEN_GPT2 | _GGUF_PRE_GPT2)})")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens has duplicate entries")
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    special, normal = _added_tokens(tokens, types)
    tok.add_special_tokens(special)
    tok.add_tokens(normal)
    return tok


def _gguf_llama(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int], source: str) -> Any:
    """SentencePiece-BPE vocab (pieces + scores) as a ``tokenizers`` BPE with byte fallback.

    SentencePiece merges the adjacent pair whose union has the highest score; a BPE whose merge
    ranks follow the merged piece's score (best first) makes the same choices.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise TokenizerError(f"{source}: GGUF llama tokenizer needs tokenizer.ggml.scores, one per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (GGUF_NORMAL, GGUF_USER_DEFINED)}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[i]), i, cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norms = ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(norms)
    decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decs + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    special, normal = _added_tokens(tokens, types)
    tok.add_special_tokens(special)
    tok.add_tokens(normal)
    return tok
