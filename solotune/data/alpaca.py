"""Alpaca instruction data: load + validate records, the Stanford Alpaca prompt, tokenisation with
prompt-masked labels, a fixed split, a seeded per-epoch order, and a right-padding collate.

Shapes: B batch, T longest sequence in the batch (dynamic per batch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch

from ..errors import SolotuneError

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt, bos, padding)

SAMPLE_NAME = "alpaca-sample"
SAMPLE_PATH = Path(__file__).with_name("alpaca_sample.json")  # records 0-499 of alpaca_data.json

# The two Stanford Alpaca prompts (tatsu-lab/stanford_alpaca, README "We used the following prompts").
# Wording checked against PROMPT_DICT in the repo's train.py. One deliberate difference from that
# file: train.py ends the prompt at "### Response:" and glues the output straight on, while the
# README (and most later recipes) put the output on the next line; we end the prompt with "\n" so
# the prompt/response boundary falls on a newline, which both tokenizers we use never merge across.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

DEFAULT_TRAIN = range(0, 200)
DEFAULT_VAL = range(400, 500)


class DataError(SolotuneError, ValueError):
    """Bad training data; the message names the file, the record index and the field."""


class Tokenizer(Protocol):
    """What the data pipeline needs from ``solotune.tokenizer``."""

    bos_id: int | None  # only read when add_bos
    eos_id: int
    add_bos: bool

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


# ---------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    instruction: str
    output: str
    input: str = ""
    where: str = field(default="", compare=False, repr=False)  # "FILE: record N", for error messages

    @property
    def empty_target(self) -> bool:
        """True when the output is empty: the record trains only the end-of-text token."""
        return not self.output


@dataclass
class AlpacaRecords(Sequence[Record]):
    """The validated records of one source: Alpaca :class:`Record`s and, from ``messages`` /
    ShareGPT ``conversations`` records, :class:`~solotune.data.conversations.Conversation`s.

    ``indices[i]`` is the index of ``records[i]`` in the source (so a split by index is not shifted
    by skipped records); ``total`` counts every record in the source, good or bad; ``skipped`` bad
    records were dropped (``skip_bad``), each with its reason in ``problems``. ``empty_outputs``
    holds the source indices of the valid records whose output is empty (they train only EOS).
    """

    records: list[Record]
    source: str
    indices: list[int] = field(default_factory=list)
    total: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    empty_outputs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.indices:
            self.indices = list(range(len(self.records)))
        self.total = max(self.total, len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # int -> Record, slice -> list[Record]
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


def _check_record(obj: Any, where: str) -> Record:
    """One raw JSON value -> Record, or DataError naming ``where`` (file + record index) and the field.

    Only structural problems are errors: a missing field, a wrong type, and an empty instruction
    (there is nothing to condition the answer on, so the record cannot teach anything). An empty
    (or whitespace-only) output is valid and becomes ``""``: the record then trains only the EOS
    token, i.e. "stop right after the prompt", as Stanford's train.py did with such records.
    """
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "output"):
        if key not in obj:
            raise DataError(f"{where}: field {key!r} is missing (a record is Alpaca {{instruction, input, output}}, "
                            f"{{messages: [{{role, content}}...]}} or ShareGPT {{conversations: [{{from, value}}...]}})")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    inp = obj.get("input", "")
    if inp is None:  # some Alpaca re-exports write null for "no input"
        inp = ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
    output = obj["output"] if obj["output"].strip() else ""
    return Record(instruction=obj["instruction"], output=output, input=inp, where=where)


def _raw_json(path: Path) -> list[tuple[str, Any] | None]:
    """A JSON list file -> [(where, value)]; malformed JSON is one DataError with line/column."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path}: record {i}", obj) for i, obj in enumerate(data)]


def _raw_jsonl(path: Path, skip_bad: bool, problems: list[str]) -> list[tuple[str, Any] | None]:
    """A JSON-lines file -> [(where, value)]; blank lines are ignored, the record index counts the
    non-blank lines. A malformed line is a DataError (or, with ``skip_bad``, noted in ``problems``
    and kept as a None placeholder so later indices do not shift)."""
    out: list[tuple[str, Any] | None] = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    idx = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: record {idx} (line {lineno})"
        idx += 1
        try:
            out.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            msg = f"{where}: invalid JSON at column {e.colno}: {e.msg}"
            if not skip_bad:
                raise DataError(msg) from None
            problems.append(msg)
            out.append(None)
    return out


def _reject_single_object(path: Path) -> None:
    """A .json file holding one (pretty-printed) object is neither a record list nor JSON lines."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # JSON lines (or broken): the line-by-line reader reports it
    if isinstance(data, Mapping) and "\n" in path.read_text(encoding="utf-8-sig").strip():
        raise DataError(f"{path}: one JSON object spanning several lines; expected a JSON list of records "
                        f"or one record per line (JSON lines)")


def _raw_hf(name: str) -> list[tuple[str, Any]]:
    """A Hugging Face datasets id (e.g. ``tatsu-lab/alpaca``), train split."""
    import datasets  # optional dependency: pip install solotune[datasets]

    ds = datasets.load_dataset(name, split="train")
    return [(f"{name}: record {i}", dict(row)) for i, row in enumerate(ds)]


def load_records(source: str | Path, skip_bad: bool = False,
                 check: Callable[[Any, str], Any] | None = None) -> AlpacaRecords:
    """Load Alpaca records from a JSON list file (first non-blank character ``[``), a JSON-lines
    file (``.jsonl``/``.ndjson``, or any other file), the bundled ``"alpaca-sample"`` (500 records), or
    a Hugging Face datasets id (only when ``datasets`` is installed).

    Every record needs a non-empty string ``instruction`` and a string ``output`` (which may be
    empty: see :func:`_check_record`; such records are listed in ``.empty_outputs``); ``input`` is
    optional (a string). ``check(value, where)`` validates one record instead of
    :func:`_check_record` (``solotune.data.load_records`` passes the one that also takes
    conversations, ``data/conversations.py``). A bad record raises one :class:`DataError` naming the file, record index
    and field, unless ``skip_bad``: then it is dropped and counted in ``.skipped``. An empty result
    is an error.
    """
    problems: list[str] = []
    if str(source) == SAMPLE_NAME:
        path, label = SAMPLE_PATH, SAMPLE_NAME
    else:
        path, label = Path(source), str(source)
    if path.is_file():
        with path.open("rb") as f:
            first = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or first != b"["
        if jsonl and first == b"{" and path.suffix.lower() == ".json":
            _reject_single_object(path)
        raw = _raw_jsonl(path, skip_bad, problems) if jsonl else _raw_json(path)
    elif path.exists():
        raise DataError(f"{source}: not a file")
    elif importlib.util.find_spec("datasets") is not None and "/" in str(source) and not Path(source).suffix:
        raw = _raw_hf(str(source))
    else:
        raise DataError(f"{source}: no such file (and not {SAMPLE_NAME!r}; Hugging Face dataset ids need "
                        f"the optional 'datasets' package)")

    records: list[Record] = []
    indices: list[int] = []
    for i, item in enumerate(raw):
        if item is None:  # malformed JSONL line, already noted
            continue
        try:
            records.append((check or _check_record)(item[1], item[0]))
            indices.append(i)
        except DataError as e:
            if not skip_bad:
                raise
            problems.append(str(e))
    if not records:
        detail = f" ({len(problems)} bad records skipped; first: {problems[0]})" if problems else ""
        raise DataError(f"{label}: no records{detail}")
    empty = [i for i, r in zip(indices, records) if r.empty_target]
    return AlpacaRecords(records=records, source=label, indices=indices, total=len(raw),
                         skipped=len(problems), problems=problems, empty_outputs=empty)


def split(records: Sequence[Record], train: range = DEFAULT_TRAIN,
          val: range = DEFAULT_VAL) -> tuple[list[Record], list[Record]]:
    """Fixed split by source index (default: train = records 0-199, val = records 400-499).

    For :class:`AlpacaRecords` the indices are those of the source file, so records skipped as bad
    leave a hole instead of shifting the split. The ranges must lie inside the source, must not
    overlap, and must each select at least one record.
    """
    indices = getattr(records, "indices", None) or list(range(len(records)))
    total = getattr(records, "total", len(records))
    if set(train) & set(val):
        raise DataError(f"train split {train} and val split {val} overlap")
    out = []
    for name, r in (("train", train), ("val", val)):
        if len(r) and (min(r) < 0 or max(r) >= total):
            raise DataError(f"{name} split {r} is outside the {total} records")
        wanted = set(r)
        part = [rec for i, rec in zip(indices, records) if i in wanted]
        if len(r) and not part:
            raise DataError(f"{name} split {r} selects no valid record")
        out.append(part)
    return out[0], out[1]


# ---------------------------------------------------------------------------------- tokenisation
def _as_record(record: Record | Mapping[str, Any]) -> Record:
    r = record if isinstance(record, Record) else _check_record(record, "record")
    if not isinstance(r, Record):
        raise DataError(f"{getattr(r, 'where', '') or 'record'}: a conversation, not an Alpaca record "
                        f"(tokenize it with solotune.data.conversations.tokenize_example)")
    return r


def format_prompt(record: Record | Mapping[str, Any]) -> str:
    """The Alpaca prompt for ``record`` (with-input variant when ``input`` is non-empty), ending in
    "### Response:\\n"."""
    r = _as_record(record)
    if r.input.strip():
        return PROMPT_INPUT.format(instruction=r.instruction, input=r.input)
    return PROMPT_NO_INPUT.format(instruction=r.instruction)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Plain-text ids: data that happens to contain "</s>" or "<|im_end|>" is text, not a control
    token (``allow_special=False`` where the tokenizer has that switch)."""
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    if "allow_special" in params:
        return tokenizer.encode(text, allow_special=False)
    return tokenizer.encode(text)


def encode_continuation(tokenizer: Tokenizer, text: str, after: str = "\n") -> list[int]:
    """Tokens of ``text`` as they come out when ``text`` follows ``after`` in one string.

    Why: prompt and response are tokenised separately (so the label boundary is exact and never
    splits a token), but SentencePiece prepends a "▁" to every fresh string, so ``encode(output)``
    alone would start with "▁The" where the joint text has "The". Encoding ``after + text`` and
    dropping the tokens of ``after`` gives the in-context tokens. Falls back to a plain encode when
    the prefix tokens do not come out unchanged (a tokenizer that merges across the newline).
    """
    prefix = encode_text(tokenizer, after)
    both = encode_text(tokenizer, after + text)
    if both[: len(prefix)] == prefix:
        return both[len(prefix):]
    return encode_text(tokenizer, text)


@dataclass
class Example:
    """One tokenised record: ``labels[i]`` is the target for ``input_ids[i]`` (the loss shifts by
    one), IGNORE_INDEX on bos + prompt."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def tokenize_record(record: Record | Mapping[str, Any], tokenizer: Tokenizer, max_seq_len: int = 512) -> Example:
    """ids = [bos if tokenizer.add_bos] + prompt + output + [eos]; labels mask bos + prompt.

    Prompt and output are tokenised separately and concatenated (output via
    :func:`encode_continuation`), so the prompt length is exact; for LLaMA-2's SentencePiece and
    byte-level BPE this equals tokenising the joined text. Longer than ``max_seq_len`` -> cut at the
    end (the eos is lost) and ``truncated`` set.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    r = _as_record(record)
    head = ([tokenizer.bos_id] if tokenizer.add_bos else []) + encode_text(tokenizer, format_prompt(r))
    target = encode_continuation(tokenizer, r.output) + [tokenizer.eos_id]
    ids = head + target
    labels = [IGNORE_INDEX] * len(head) + target
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], truncated)


class AlpacaDataset(Sequence[Example]):
    """Tokenised records.

    ``num_truncated``: examples cut at ``max_seq_len``; ``num_no_target``: those cut so hard that no
    target token is left (they add nothing to the loss); ``num_target_tokens``: tokens the loss sees.
    """

    def __init__(self, records: Iterable[Record | Mapping[str, Any]], tokenizer: Tokenizer, max_seq_len: int = 512,
                 tokenize: Callable[[Any, Tokenizer, int], Example] | None = None) -> None:
        self.max_seq_len = max_seq_len
        tokenize = tokenize or tokenize_record  # conversations: data.conversations.tokenized picks per template
        self.examples = [tokenize(r, tokenizer, max_seq_len) for r in records]
        self.num_truncated = sum(e.truncated for e in self.examples)
        self.num_no_target = sum(e.num_targets == 0 for e in self.examples)
        self.num_target_tokens = sum(e.num_targets for e in self.examples)
        self.num_tokens = sum(len(e.input_ids) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return (f"AlpacaDataset({len(self)} examples, {self.num_tokens} tokens, {self.num_target_tokens} targets, "
                f"{self.num_truncated} truncated at {self.max_seq_len})")


# --------------------------------------------------------------------------------- order + batches
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), a pure function of (seed, epoch): no global RNG is touched, and a
    resumed run gets the same order for the same epoch."""
    digest = hashlib.sha256(f"solotune-order:{seed}:{epoch}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to ``pad_to_multiple_of``).

    Returns input_ids [B, T] long (pad_id on padding), labels [B, T] long (IGNORE_INDEX on padding),
    attention_mask [B, T] bool (True = real token).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
