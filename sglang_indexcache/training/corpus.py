"""The embedded model's corpus, tokenizer and held-out files, from text present on every machine.

Documents: every ``*.py`` file of CPython's standard library (``sysconfig.get_paths()["stdlib"]``,
sorted by relative path, ``site-packages`` / ``dist-packages`` left out, files that are not UTF-8
skipped) and the English text of each ``pydoc_data.topics`` entry. A document is held out when
the SHA-256 of its name falls in the lowest ``heldout_fraction`` of the hash space, so the split
depends on names only, not on the Python version or file order. Held-out documents are never
trained on; the two held-out files (``calibration.txt``, ``evaluation.txt``) are cut from them.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the training documents only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sglang_indexcache.errors import DataError
from sglang_indexcache.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
HELDOUT_FRACTION = 0.04
HELDOUT_MAX_DOC_BYTES = 40_000  # a held-out file is cut from documents at most this long
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    name: str  # "stdlib/<path relative to the stdlib root>" or "pydoc/<topic>"
    text: str


def stdlib_documents(root: str | Path | None = None) -> list[Document]:
    """The standard library's ``*.py`` sources as documents, sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"standard library folder {root} not found")
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        if text.strip():
            docs.append(Document("stdlib/" + rel.as_posix(), text))
    return docs


def topic_documents() -> list[Document]:
    """The English help topics of ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data.topics import topics

    return [Document("pydoc/" + name, topics[name]) for name in sorted(topics) if topics[name].strip()]


def all_documents(stdlib_root: str | Path | None = None) -> list[Document]:
    return stdlib_documents(stdlib_root) + topic_documents()


def name_rank(name: str) -> float:
    """A document's position in [0, 1) of the hash space (deterministic, order-free)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], heldout_fraction: float = HELDOUT_FRACTION):
    """``(train, heldout)``: held out iff ``name_rank(name) < heldout_fraction``; held-out docs
    are returned in hash order."""
    train = [d for d in docs if name_rank(d.name) >= heldout_fraction]
    heldout = sorted((d for d in docs if name_rank(d.name) < heldout_fraction), key=lambda d: name_rank(d.name))
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (``tokenizers``) wrapped as a transformers fast tokenizer, EOS set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        model_max_length=1 << 20, clean_up_tokenization_spaces=False,
    )


def encode_stream(texts: list[str], tokenizer) -> np.ndarray:
    """All documents' tokens, each followed by EOS, as one ``uint16`` array ``[n_tokens]``."""
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise DataError(f"vocabulary of {len(tokenizer)} does not fit uint16 token ids")
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    parts = []
    for start in range(0, len(texts), 256):
        for enc in backend.encode_batch(texts[start:start + 256], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def heldout_texts(heldout: list[Document], tokenizer, target_tokens: int) -> tuple[str, str]:
    """``(calibration, evaluation)`` texts, each at least ``target_tokens`` tokens (when the
    held-out documents allow), from held-out documents of at most ``HELDOUT_MAX_DOC_BYTES``
    bytes, alternating between the two files in hash order (so both mix code and prose)."""
    files: list[list[str]] = [[], []]
    counts = [0, 0]
    for doc in heldout:
        if len(doc.text.encode()) > HELDOUT_MAX_DOC_BYTES:
            continue
        open_files = [i for i in (0, 1) if counts[i] < target_tokens]
        if not open_files:
            break
        i = min(open_files, key=lambda j: counts[j])
        files[i].append(doc.text.strip("\n"))
        counts[i] += len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    if min(counts) < target_tokens:
        raise DataError(f"held-out documents give only {counts} tokens; need {target_tokens} per file")
    return DOC_SEPARATOR.join(files[0]) + "\n", DOC_SEPARATOR.join(files[1]) + "\n"


def build(out_dir: str | Path, work_dir: str | Path, vocab_size: int = 4096, heldout_tokens: int = 56_000,
          stdlib_root: str | Path | None = None) -> dict:
    """Write the tokenizer (``out_dir``), ``out_dir/data/{calibration,evaluation}.txt`` and the
    training stream ``work_dir/train_tokens.npy`` (uint16, EOS-separated); return metadata."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    docs = all_documents(stdlib_root)
    train, heldout = split_documents(docs)
    if not train or not heldout:
        raise DataError(f"corpus split gave {len(train)} training and {len(heldout)} held-out documents")
    log.info("corpus: %d documents (%d train, %d held out)", len(docs), len(train), len(heldout))
    train_texts = [d.text for d in train]
    tokenizer = train_tokenizer(train_texts, vocab_size)
    tokenizer.save_pretrained(out_dir)
    calibration, evaluation = heldout_texts(heldout, tokenizer, heldout_tokens)
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data / "calibration.txt", calibration)
    atomic_write_text(data / "evaluation.txt", evaluation)
    stream = encode_stream(train_texts, tokenizer)
    with atomic_path(work_dir / "train_tokens.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, stream)  # a file object: np.save would add ".npy" to the temporary name
    meta = {
        "python": sys.version.split()[0], "documents": len(docs), "train_documents": len(train),
        "heldout_documents": len(heldout), "train_tokens": int(stream.size), "vocab_size": len(tokenizer),
        "train_bytes": sum(len(t.encode()) for t in train_texts),
        "calibration_tokens": len(tokenizer(calibration, add_special_tokens=False)["input_ids"]),
        "evaluation_tokens": len(tokenizer(evaluation, add_special_tokens=False)["input_ids"]),
    }
    atomic_write_text(work_dir / "corpus.json", json.dumps(meta, indent=2) + "\n")
    log.info("corpus: %s", meta)
    return meta


def prepare(out_dir: str | Path, work_dir: str | Path, vocab_size: int = 4096, rebuild: bool = False):
    """The tokenizer (from ``out_dir``) and training stream (from ``work_dir``) of a tiny-model run,
    built first (:func:`build`) when ``rebuild`` or when any of them is missing."""
    from transformers import AutoTokenizer

    out, work = Path(out_dir), Path(work_dir)
    ready = all(p.is_file() for p in (out / "tokenizer.json", out / "data" / "evaluation.txt",
                                      work / "train_tokens.npy"))
    if rebuild or not ready:
        build(out, work, vocab_size=vocab_size)
    return AutoTokenizer.from_pretrained(out), load_train_stream(work)


def load_train_stream(work_dir: str | Path) -> np.ndarray:
    """The training token stream written by :func:`build` (``uint16 [n_tokens]``)."""
    path = Path(work_dir) / "train_tokens.npy"
    if not path.is_file():
        raise DataError(f"training tokens {path} not found (build the corpus first)")
    return np.load(path)
