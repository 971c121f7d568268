"""The tokenizer of a benchmark cell, shared by solotune's cell (``cell.py``) and the HF reference
cell (``hf_cell.py``): the bundled LLaMA-2 tokenizer, its ids folded into a smaller vocabulary
for toy architectures."""

from __future__ import annotations

from typing import Any


class FoldedTokenizer:
    """Wrap a tokenizer for a model whose vocabulary is smaller (toy test models): ids are taken
    modulo ``vocab_size``; bos/eos keep their ids. The text is real, the ids are not meaningful."""

    def __init__(self, inner: Any, vocab_size: int) -> None:
        self.inner, self.vocab_size = inner, vocab_size
        self.bos_id, self.eos_id = inner.bos_id, inner.eos_id
        self.add_bos = getattr(inner, "add_bos", True)
        self.pad_id = getattr(inner, "pad_id", None)
        self.source = f"{getattr(inner, 'source', 'tokenizer')} (ids mod {vocab_size})"
        if max(self.bos_id, self.eos_id) >= vocab_size:
            raise ValueError(f"vocab {vocab_size} is too small for bos/eos ids {self.bos_id}/{self.eos_id}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [i % self.vocab_size for i in self.inner.encode(text, bos=bos, eos=eos)]

    def decode(self, ids: Any, *args: Any, **kw: Any) -> str:
        return self.inner.decode(list(ids), *args, **kw)


def cell_tokenizer(vocab_size: int, tok: Any) -> Any:
    """``tok`` itself, or folded into ``vocab_size`` when the model's vocabulary is smaller."""
    tok_vocab = getattr(tok, "vocab_size", 32000)
    return tok if vocab_size >= tok_vocab else FoldedTokenizer(tok, vocab_size)


def preset_cell_tokenizer(vocab_size: int) -> Any:
    """The bundled LLaMA-2 tokenizer for a preset architecture of ``vocab_size`` (random weights)."""
    from ..api import BUNDLED_LLAMA2_TOKENIZER
    from ..tokenizer import load_tokenizer

    return cell_tokenizer(vocab_size, load_tokenizer(BUNDLED_LLAMA2_TOKENIZER))


__all__ = ["FoldedTokenizer", "cell_tokenizer", "preset_cell_tokenizer"]
