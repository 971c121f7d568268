"""Training data: Alpaca instruction records -> prompt-masked token examples -> padded batches."""

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
    load_records,
    split,
    tokenize_record,
)

__all__ = [
    "IGNORE_INDEX", "AlpacaDataset", "AlpacaRecords", "DataError", "Example", "Record", "collate",
    "epoch_order", "format_prompt", "load_records", "split", "tokenize_record",
]
