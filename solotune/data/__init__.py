"""Training data: Alpaca instruction records and conversations (messages / ShareGPT) -> label-masked
token examples (Alpaca prompt or the model's chat template) -> padded batches."""

from .alpaca import (
    IGNORE_INDEX,
    AlpacaDataset,
    AlpacaRecords,
    DataError,
    Example,
    Record,
    collate,
    epoch_order,
    format_prompt,
    split,
    tokenize_record,
)
from .conversations import (
    TEMPLATES,
    Conversation,
    Turn,
    load_records,
    resolve_template,
    tokenize_conversation,
    tokenize_example,
    tokenized,
)

__all__ = [
    "IGNORE_INDEX", "TEMPLATES", "AlpacaDataset", "AlpacaRecords", "Conversation", "DataError", "Example", "Record",
    "Turn", "collate", "epoch_order", "format_prompt", "load_records", "resolve_template", "split",
    "tokenize_conversation", "tokenize_example", "tokenize_record", "tokenized",
]
