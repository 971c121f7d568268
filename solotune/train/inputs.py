"""A run's data: read and split the records (no tokenizer, so before the model loads), then tokenise.

:func:`check_data` is cheap and raises every data or range problem (:class:`DataError`,
:class:`ConfigError`) before any model weight is read; :func:`load_data` tokenises what it checked.

Splits by record index in the source. Without ``train_range``/``val_range`` (None, the default):
the bundled ``alpaca-sample`` keeps the course's fixed split (train 0-199, validation 400-499, so
every earlier run's numbers stay comparable), and any other data holds out its last 5% (at least
one record) for validation and trains on the rest.

Records are Alpaca records or conversations (``messages`` / ShareGPT); ``cfg.template`` picks how
each is rendered (``solotune/data/conversations.py``: alpaca, chat, or auto per record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..data import AlpacaDataset, AlpacaRecords, Conversation, DataError, Record, load_records, split, tokenized
from ..data.alpaca import DEFAULT_TRAIN, DEFAULT_VAL, SAMPLE_NAME
from ..data.synthetic import RANDOM, RandomSplit
from ..data.conversations import check_template, template_counts
from ..errors import ConfigError
from .config import TrainConfig

VAL_FRACTION = 0.05  # of a user's records, held out for validation when no --val-range is given


@dataclass
class CheckedData:
    """The records of a run, split; unpacks as ``train, val = check_data(cfg)``."""

    train: list[Record | Conversation]
    val: list[Record | Conversation]
    train_range: range  # source indices actually used (after max_samples / val_samples)
    val_range: range
    source: AlpacaRecords

    def __iter__(self) -> Iterator[list[Record | Conversation]]:
        return iter((self.train, self.val))

    @property
    def empty_outputs(self) -> int:
        """Records of the train + val splits with an empty output (each trains only EOS)."""
        return sum(r.empty_target for r in self.train) + sum(r.empty_target for r in self.val)


def auto_ranges(data: str, total: int, train: tuple[int, int] | None,
                val: tuple[int, int] | None) -> tuple[range, range]:
    """(train, val) ranges for ``total`` records: the given ones, else the defaults (module doc)."""
    if data == SAMPLE_NAME:
        auto_train, auto_val = DEFAULT_TRAIN, DEFAULT_VAL
    else:
        n_val = max(1, int(total * VAL_FRACTION))
        auto_train, auto_val = range(0, total - n_val), range(total - n_val, total)
    return (range(*train) if train is not None else auto_train,
            range(*val) if val is not None else auto_val)


def check_data(cfg: TrainConfig) -> CheckedData | RandomSplit:
    """Read ``cfg.data`` and split it per ``cfg`` (ranges, max_samples, val_samples), no tokenizer.

    Raises DataError for bad records (and for conversations the Alpaca prompt cannot hold, with
    ``template="alpaca"``) and ConfigError for ranges that do not fit the data; the message names
    the flags and the record count.
    """
    if cfg.data == RANDOM:  # synthetic rows (data/synthetic.py): nothing to read or check
        return RandomSplit.of(cfg.max_seq_len, cfg.seed, cfg.train_range, cfg.val_range, cfg.max_samples,
                              cfg.val_samples)
    records = load_records(cfg.data, skip_bad=cfg.skip_bad_records)
    train_range, val_range = auto_ranges(cfg.data, records.total, cfg.train_range, cfg.val_range)
    train_range = train_range[: cfg.max_samples] if cfg.max_samples is not None else train_range
    val_range = val_range[: cfg.val_samples] if cfg.val_samples is not None else val_range
    if not len(train_range):
        raise ConfigError(f"the train split {_text(train_range)} is empty ({_hint(cfg.data, records.total)}; "
                          f"a run needs at least one record to train on and one to validate on)")
    train, val = split_records(records, cfg.data, train_range, val_range)
    check_template([*train, *val], cfg.template)
    return CheckedData(train, val, train_range, val_range, records)


def split_records(records: AlpacaRecords, data: str, train: range,
                  val: range) -> tuple[list[Record | Conversation], list[Record | Conversation]]:
    """:func:`split`, with range errors as ConfigError naming the flags and the record count."""
    try:
        return split(records, train=train, val=val)
    except DataError as e:
        raise ConfigError(f"{e} ({_hint(data, records.total)})") from None


def _hint(data: str, total: int) -> str:
    return f"{data} has {total} records; pass --train-range / --val-range START:STOP within 0:{total}"


def load_data(cfg: TrainConfig, tokenizer: Any, say=print,
              records: CheckedData | None = None) -> tuple[AlpacaDataset, AlpacaDataset]:
    """Checked records (``records``, else :func:`check_data`) -> tokenised train/val sets; reports
    the split, skipped and empty-output records, and truncation (one line each, only when any)."""
    data = records if records is not None else check_data(cfg)
    if isinstance(data, RandomSplit):
        return data.datasets(tokenizer.vocab_size, say)
    src = data.source
    if src.skipped:
        say(f"skipped {src.skipped} bad records in {src.source} (first: {src.problems[0]})")
    if data.empty_outputs:
        n = data.empty_outputs
        say(f"{n} record{'s' if n != 1 else ''} of the splits with an empty output in {src.source}: "
            f"{'each trains' if n != 1 else 'it trains'} only the end-of-text token")
    counts = template_counts([*data.train, *data.val], tokenizer, cfg.template)
    if counts != {"alpaca": len(data.train) + len(data.val)}:  # say so whenever anything is not the Alpaca prompt
        say(_template_line(counts, cfg.template, tokenizer))
    train = tokenized(data.train, tokenizer, cfg.max_seq_len, cfg.template)
    val = tokenized(data.val, tokenizer, cfg.max_seq_len, cfg.template)
    say(f"train: records {_text(data.train_range)} {train}\nval:   records {_text(data.val_range)} {val}")
    for name, ds in (("train", train), ("val", val)):
        if ds.num_truncated:
            say(f"{name}: {ds.num_truncated} of {len(ds)} records truncated at max_seq_len={cfg.max_seq_len}"
                + (f" ({ds.num_no_target} left with no target token)" if ds.num_no_target else ""))
    return train, val


def chat_samples(cfg: TrainConfig, tokenizer: Any, records: CheckedData) -> bool:
    """Whether the run's sample generations are chat prompts: the template renders most of the
    train records through the chat template."""
    counts = template_counts(records.train, tokenizer, cfg.template)
    return counts.get("chat", 0) > counts.get("alpaca", 0)


def _template_line(counts: dict[str, int], template: str, tokenizer: Any) -> str:
    chat = "the model's chat template" if getattr(tokenizer, "chat_template", None) else "LLaMA-2's [INST] format"
    parts = [f"{n} through {chat if kind == 'chat' else 'the Alpaca prompt'}" for kind, n in sorted(counts.items())]
    return f"template {template}: records of the splits {', '.join(parts)} (labels: the answers and their end token)"


def _text(r: range) -> str:
    return f"{r.start}:{r.stop}"
