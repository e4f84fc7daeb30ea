"""Calibration and evaluation text: read with `datasets`, tokenized into fixed-length blocks.

``SRC`` is a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, a folder of such files (one kind), or a
hub dataset name where the network allows. ``.txt`` files are read one document per file; jsonl and
parquet one document per row, from ``text_field`` (default ``text``). With a ``seed`` the documents
are shuffled (``random.Random(seed)``) before the token budget is taken, so a budget smaller than
the source samples all of it, the same way for the same seed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from sglang_indexcache.errors import DataError

log = logging.getLogger(__name__)
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class TokenBlocks:
    """Tokenized text cut into ``[n_blocks, seq_len]`` blocks (the same for every pattern)."""

    input_ids: "object"  # torch.LongTensor [n_blocks, seq_len]
    source: str
    sha256: str           # hash of the token ids, so a pattern file names exactly its data
    tokens: int
    seed: int | None = None  # the documents' shuffle (None: the source's order)

    def batches(self, batch_size: int):
        for start in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[start:start + batch_size]

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens, "seed": self.seed}


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise DataError(f"{path} holds no .txt/.jsonl/.parquet files")
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"{files[0]}: unsupported data file type {files[0].suffix!r} (use .txt, .jsonl or .parquet)")
    if len(kinds) > 1:
        raise DataError(f"{path} mixes file types {sorted(kinds)}; use one kind per folder")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"data file {p} is empty")
        if p.suffix in (".txt", ".jsonl", ".json"):
            try:
                p.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"data file {p} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    return kinds.pop(), [str(p) for p in files]


def _looks_local(source) -> bool:
    """A source meant as a local path (not a hub dataset name)."""
    text = str(source)
    return Path(text).exists() or text.startswith((".", "/", "~")) or Path(text).suffix in BUILDERS


def check_source(source) -> tuple[str, list[str]] | None:
    """Every check of a local data source that needs neither ``datasets`` nor torch: it exists, is a
    file or a folder of one kind of .txt/.jsonl/.parquet files, none empty, text ones UTF-8.

    Returns ``(builder, files)`` for a local source, None for a hub dataset name. Commands call it
    before loading anything, so a bad ``--data`` costs no model load and no ``datasets`` import.
    """
    if source is None:
        return None
    if not _looks_local(source):
        return None
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise DataError(f"data source {source} does not exist")
    return _local_files(path)


def load_texts(source, text_field: str = "text", limit: int | None = None) -> list[str]:
    """The documents of ``source`` as a list of strings (empty documents dropped)."""
    local = check_source(source)  # before importing datasets: a bad path is refused at once
    if local is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files: never ask the hub
    import datasets

    datasets.disable_progress_bars()
    try:
        if local is not None:
            builder, files = local
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        else:
            dataset = datasets.load_dataset(str(source), split="train")
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"data source {source} is not UTF-8 text: {exc}") from exc
    except Exception as exc:  # datasets raises many types for unreadable input; name the source
        raise DataError(f"cannot read data source {source}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    if text_field not in dataset.column_names:
        raise DataError(
            f"data source {source} has no text field {text_field!r}; columns: {', '.join(dataset.column_names)}"
            " (choose one with --text-field)"
        )
    texts = [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise DataError(f"data source {source} has no non-empty text in field {text_field!r}")
    return texts


def tokenize_blocks(texts, tokenizer, seq_len: int, max_tokens: int | None = None,
                    source: str = "", eos: bool = True) -> TokenBlocks:
    """Concatenate the documents' tokens (EOS between documents) and cut ``seq_len`` blocks.

    ``tokenizer`` is a HF tokenizer (anything with ``__call__`` returning ``input_ids``). The last
    partial block is dropped; at most ``max_tokens`` tokens are kept.
    """
    import torch

    ids: list[int] = []
    eos_id = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos and eos_id is not None:
            ids.append(eos_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"data source {source or '?'} gives {len(ids)} tokens, fewer than one block of {seq_len}"
        )
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    digest = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()
    return TokenBlocks(blocks, str(source), "sha256:" + digest, int(blocks.numel()))


def load_blocks(source, tokenizer, seq_len: int, max_tokens: int | None = None,
                text_field: str = "text", seed: int | None = None) -> TokenBlocks:
    """``load_texts``, the documents shuffled with ``seed`` (if given), then ``tokenize_blocks``."""
    texts = load_texts(source, text_field)
    if seed is not None:
        random.Random(seed).shuffle(texts)
    blocks = tokenize_blocks(texts, tokenizer, seq_len, max_tokens, source=str(source))
    blocks.seed = seed
    return blocks
