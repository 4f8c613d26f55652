"""Corpus -> token windows: the text a run scores and which predictions count; documents packed for training.

- ``corpus``: readers (the built-in ``pydoc`` text, text, JSONL, Parquet, globs) and ``corpus_windows``, read and cut
  in one call;
- ``windows``: ``Protocol`` (which windows, which positions) and ``Windows`` (tokens, scored mask, fingerprint);
- ``spans``: JSONL records (prompt/response, chat) scored on their responses only;
- ``packing``: training windows (``Packed``), a BPE tokenizer learned from documents.
"""

from tailjax.data import spans
from tailjax.data.corpus import BUILTIN_CORPORA, check_corpus, corpus_windows, read_documents, split_documents
from tailjax.data.packing import Packed, pack_documents, packed, train_bpe
from tailjax.data.windows import DEFAULT_PROTOCOL, PROTOCOLS, Protocol, Windows, make_windows, shuffled_rows

__all__ = ["BUILTIN_CORPORA", "DEFAULT_PROTOCOL", "PROTOCOLS", "Packed", "Protocol", "Windows", "check_corpus",
           "corpus_windows", "make_windows", "pack_documents", "packed", "read_documents", "shuffled_rows", "spans",
           "split_documents", "train_bpe"]
