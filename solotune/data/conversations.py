"""Conversation data: ``messages`` and ShareGPT records, the ``alpaca|chat|auto`` template choice,
and chat-template tokenisation where only the assistant turns are labels.

Record formats (one JSON object per record, in a JSON list or JSON lines, as for Alpaca):

* messages: ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}``
  (``user``/``assistant`` are accepted in ``from`` too). Other keys (``id``, ``name``...) are ignored.

A conversation is an optional system turn, then user and assistant turns alternating, starting
with a user turn and ending with an assistant turn (a trailing question nothing answers teaches
nothing, and most chat templates reject other orders). An empty assistant answer is allowed: that
turn trains only its end-of-turn token.

Templates (``TrainConfig.template``):

* ``chat``: render the whole conversation with the model's chat template (without one: LLaMA-2's
  ``[INST]`` format, :func:`solotune.tokenizer.llama2_chat`); the input ids are exactly the rendered
  string tokenised (``Tokenizer.encode``), and the labels are each assistant turn's tokens through
  the end-of-turn token that closes it (``<|im_end|>``, ``</s>``...). An Alpaca record becomes one
  user turn (instruction, then the input after a blank line) and one assistant turn (the output).
* ``alpaca``: the Stanford Alpaca prompt (``data/alpaca.py``); a conversation must then be a single
  user/assistant exchange without a system turn.
* ``auto`` (the default), decided per record: an Alpaca record uses the Alpaca prompt (its
  instruction/input split was written for it, and earlier runs on Alpaca data stay the same); a
  conversation uses the model's chat template when the tokenizer has one (instruct models), and the
  Alpaca prompt otherwise (a base model has no chat format of its own to follow; multi-turn
  conversations then need ``--template chat``, which falls back to LLaMA-2's format).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from pathlib import Path

from . import alpaca
from .alpaca import IGNORE_INDEX, AlpacaDataset, AlpacaRecords, DataError, Example, Record, format_prompt, tokenize_record

TEMPLATES = ("auto", "alpaca", "chat")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    """A validated conversation (see the module doc for the rules)."""

    turns: tuple[Turn, ...]
    where: str = field(default="", compare=False, repr=False)  # "FILE: record N", for error messages

    @property
    def messages(self) -> list[dict[str, str]]:
        """``[{"role": ..., "content": ...}]``, what chat templates render."""
        return [{"role": t.role, "content": t.content} for t in self.turns]

    @property
    def empty_target(self) -> bool:
        """True when every assistant answer is empty (the record trains only end-of-turn tokens)."""
        return not any(t.content for t in self.turns if t.role == "assistant")


# ------------------------------------------------------------------------------------- checking
def load_records(source: str | Path, skip_bad: bool = False) -> AlpacaRecords:
    """:func:`solotune.data.alpaca.load_records` (files, the bundled sample, HF ids, ``skip_bad``)
    where a record may also be a ``messages`` or ShareGPT conversation (:func:`check_record`)."""
    return alpaca.load_records(source, skip_bad, check=check_record)


def check_record(obj: Any, where: str) -> Record | Conversation:
    """A conversation when the object has ``messages`` or ``conversations``, else an Alpaca record."""
    if isinstance(obj, Mapping) and ("messages" in obj or "conversations" in obj):
        return check_conversation(obj, where)
    return alpaca._check_record(obj, where)


def check_conversation(obj: Mapping[str, Any], where: str) -> Conversation:
    """A ``messages`` or ShareGPT ``conversations`` record -> :class:`Conversation`, or one
    :class:`DataError` naming ``where`` (file + record) and the field, e.g. ``messages[2].role``."""
    if "messages" in obj and "conversations" in obj:
        raise DataError(f"{where}: has both 'messages' and 'conversations'; keep one")
    key, role_key, text_key, roles = (("messages", "role", "content", {r: r for r in ROLES}) if "messages" in obj
                                      else ("conversations", "from", "value", SHAREGPT_ROLES))
    turns_raw = obj[key]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns, got "
                        f"{type(turns_raw).__name__ if not isinstance(turns_raw, list) else 'an empty list'}")
    turns = []
    for k, t in enumerate(turns_raw):
        at = f"{where}: {key}[{k}]"
        if not isinstance(t, Mapping):
            raise DataError(f"{at}: expected an object with {role_key!r} and {text_key!r}, got {type(t).__name__}")
        for name in (role_key, text_key):
            if name not in t:
                raise DataError(f"{at}.{name} is missing")
            if not isinstance(t[name], str):
                raise DataError(f"{at}.{name} must be a string, got {type(t[name]).__name__}")
        if t[role_key] not in roles:
            raise DataError(f"{at}.{role_key} {t[role_key]!r} is not one of {', '.join(roles)}")
        turns.append(Turn(roles[t[role_key]], t[text_key]))
    _check_order(turns, f"{where}: {key}", role_key, text_key)
    turns = [Turn(t.role, t.content if t.content.strip() or t.role != "assistant" else "") for t in turns]
    return Conversation(tuple(turns), where)


def _check_order(turns: Sequence[Turn], at: str, role_key: str, text_key: str) -> None:
    """Optional system first, then user/assistant alternating from user, ending with assistant."""
    start = 1 if turns[0].role == "system" else 0
    for k, t in enumerate(turns):
        if k >= start:
            want = "user" if (k - start) % 2 == 0 else "assistant"
            if t.role != want:
                why = "only the first turn may be system" if t.role == "system" else f"expected {want}"
                raise DataError(f"{at}[{k}].{role_key} is {t.role!r}: {why} (an optional system turn, then user "
                                f"and assistant alternating)")
        if t.role == "user" and not t.content.strip():
            raise DataError(f"{at}[{k}].{text_key} is empty (a user turn with nothing to answer)")
    if len(turns) == start:
        raise DataError(f"{at}: has no user turn")
    if turns[-1].role != "assistant":
        raise DataError(f"{at}[{len(turns) - 1}] is the last turn and a {turns[-1].role} turn: a conversation ends "
                        f"with the assistant's answer")


# ------------------------------------------------------------------------------------ templates
def resolve_template(template: str, record: Record | Conversation, tokenizer: Any) -> str:
    """``alpaca`` or ``chat`` for ``record`` (``auto``'s rule: see the module doc)."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
    if template != "auto":
        return template
    if isinstance(record, Record):
        return "alpaca"
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def as_alpaca(record: Record | Conversation) -> Record:
    """A conversation as one Alpaca record: it must be one user turn and one assistant turn."""
    if isinstance(record, Record):
        return record
    roles = [t.role for t in record.turns]
    if roles != ["user", "assistant"]:
        what = "a system turn" if "system" in roles else f"{roles.count('assistant')} assistant turns"
        raise DataError(f"{record.where or 'conversation'}: has {what}, and the Alpaca prompt holds one user/assistant "
                        f"exchange; use --template chat (the model's chat template)")
    return Record(instruction=record.turns[0].content, output=record.turns[1].content, where=record.where)


def as_conversation(record: Record | Conversation) -> Conversation:
    """An Alpaca record as a conversation: the instruction (and input after a blank line) is the
    user turn, the output the assistant turn."""
    if isinstance(record, Conversation):
        return record
    user = record.instruction + (f"\n\n{record.input}" if record.input.strip() else "")
    return Conversation((Turn("user", user), Turn("assistant", record.output)), record.where)


def prompt_text(record: Record, chat: bool) -> str:
    """What to generate from for ``record``: its Alpaca prompt, or with ``chat`` its user turn's text
    (``generate(chat=True)`` renders it with the chat template)."""
    return as_conversation(record).turns[0].content if chat else format_prompt(record)


def check_template(records: Iterable[Record | Conversation], template: str) -> None:
    """What can be checked before the tokenizer exists: with ``alpaca``, every conversation must fit
    the Alpaca prompt (raises the first that does not)."""
    if template == "alpaca":
        for r in records:
            as_alpaca(r)


# --------------------------------------------------------------------------------- tokenisation
def tokenize_conversation(conv: Conversation, tokenizer: Any, max_seq_len: int = 512) -> Example:
    """ids = the chat template's rendering of ``conv``, tokenised; labels = each assistant turn's
    tokens through its end-of-turn token, IGNORE_INDEX elsewhere (system, user, the template's
    headers, whatever follows the end-of-turn token).

    Each assistant turn's label span is found by rendering the conversation up to that turn with the
    generation prompt (where the answer starts) and through that turn (where it ends): both must be
    prefixes of the full rendering, else the template rewrites earlier turns and there is no single
    token sequence to train on (an error). The start is the first token past the common prefix of
    the two encodings, so a token that merges across the boundary counts as a label. Longer than
    ``max_seq_len`` -> cut at the end and ``truncated`` set.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    where = conv.where or "conversation"
    for k, t in enumerate(conv.turns):
        found = tokenizer.special_text_in(t.content) if hasattr(tokenizer, "special_text_in") else None
        if found is not None:
            raise DataError(f"{where}: turn {k} ({t.role}) content holds the special token {found!r}, which the chat "
                            f"template would turn into a control token; remove it from the data")
    msgs = conv.messages
    render = functools.partial(_render, tokenizer, where=where)
    encode = functools.partial(_encode_rendered, tokenizer)
    full = render(msgs, add_generation_prompt=False)
    ids = encode(full)
    labels = [IGNORE_INDEX] * len(ids)
    stops = set(getattr(tokenizer, "stop_ids", ())) | {tokenizer.eos_id}
    for k, turn in enumerate(conv.turns):
        if turn.role != "assistant":
            continue
        before = render(msgs[:k], add_generation_prompt=True)
        through = render(msgs[: k + 1], add_generation_prompt=False)
        for name, text in (("up to", before), ("through", through)):
            if not full.startswith(text):
                raise DataError(f"{where}: the chat template renders the conversation {name} turn {k} differently from "
                                f"the whole conversation (it rewrites earlier turns), so turn {k}'s labels have no "
                                f"place; use --template alpaca or a template without that rewrite")
        start = _common_prefix(encode(before), ids)
        end = _common_prefix(encode(through), ids)
        closing = [i for i in range(start, end) if ids[i] in stops]
        if not closing:
            names = ", ".join(repr(tokenizer.id_to_token(i)) if hasattr(tokenizer, "id_to_token") else str(i)
                              for i in sorted(stops))
            raise DataError(f"{where}: the chat template closes assistant turn {k} without an end-of-turn token "
                            f"(one of {names}), so a tuned model would not learn to stop; use --template alpaca")
        stop = closing[-1] + 1
        labels[start:stop] = ids[start:stop]
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], truncated)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    if not hasattr(tokenizer, "apply_chat"):
        raise DataError(f"{where}: this tokenizer ({getattr(tokenizer, 'source', type(tokenizer).__name__)}) has no "
                        f"chat formatting; use --template alpaca")
    from ..errors import TokenizerError

    try:
        return tokenizer.apply_chat(messages, add_generation_prompt=add_generation_prompt)
    except (TokenizerError, ValueError) as e:
        raise DataError(f"{where}: the chat template cannot render this conversation: {e}") from None


def _encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Rendered chat text -> ids: special-token strings (the template's) become their ids; BOS goes
    in front when the model's prompts start with it and the template did not write it."""
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id] + ids
    return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_example(record: Record | Conversation, tokenizer: Any, max_seq_len: int = 512,
                     template: str = "auto") -> Example:
    """One record through the template :func:`resolve_template` picks for it."""
    if resolve_template(template, record, tokenizer) == "alpaca":
        return tokenize_record(as_alpaca(record), tokenizer, max_seq_len)
    return tokenize_conversation(as_conversation(record), tokenizer, max_seq_len)


def tokenized(records: Iterable[Record | Conversation], tokenizer: Any, max_seq_len: int = 512,
              template: str = "auto") -> AlpacaDataset:
    """The tokenised dataset of ``records`` (Alpaca records and conversations) under ``template``."""
    return AlpacaDataset(records, tokenizer, max_seq_len,
                         tokenize=functools.partial(tokenize_example, template=template))


def template_counts(records: Iterable[Record | Conversation], tokenizer: Any, template: str) -> dict[str, int]:
    """How many records each template renders (``{"alpaca": n, "chat": m}``, zero counts left out)."""
    counts: dict[str, int] = {}
    for r in records:
        kind = resolve_template(template, r, tokenizer)
        counts[kind] = counts.get(kind, 0) + 1
    return counts
