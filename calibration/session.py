"""Shared set-up of the model-driven commands (eval, overlap, calibrate): backend + token blocks.

Their data flags (``--data --text-field --seq-len --max-tokens --batch-size --threads``) are declared
in ``commands/options.py``; this module checks the values again for library callers.
"""

from __future__ import annotations

import logging
import os

from sglang_indexcache import checks
from sglang_indexcache.errors import DataError, UsageError

log = logging.getLogger(__name__)
DEFAULT_SEQ_LEN = 1024


def seq_len_for(config, seq_len: int | None) -> int:
    """The block length: ``seq_len`` or the default, checked against ``max_position_embeddings``."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0) or None
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if limit and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")
    return seq_len


def busy_cpu() -> bool:
    """True when other work already holds all but one core (1-minute load average >= cores - 1).

    torch's OpenMP threads then spin while descheduled: ``calibrate`` on the embedded model at load
    5 on 2 cores took 803 s with torch's 2 threads and 195 s with 1 (2026-12-02).
    """
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    cores = os.cpu_count() or 1
    return cores > 1 and load >= cores - 1


def set_threads(threads: int | None) -> None:
    """torch's CPU threads: ``threads``, or by default 1 on a busy CPU-only machine, else torch's own."""
    import torch

    checks.positive_ints({"--threads": threads})
    if threads is None and not torch.cuda.is_available() and busy_cpu():
        threads = 1
        log.info("the CPU is busy (load average %.1f on %d cores): 1 torch thread (--threads N to choose)",
                 os.getloadavg()[0], os.cpu_count())
    if threads:
        torch.set_num_threads(threads)


def load_backend(model_dir, pattern: str | None = None, threads: int | None = None):
    """TransformersBackend of ``model_dir`` (float32 on the CPU, CUDA when available)."""
    import transformers

    set_threads(threads)
    from .backend import TransformersBackend

    transformers.utils.logging.disable_progress_bar()

    return TransformersBackend.from_pretrained(model_dir, device=checks.torch_device("auto"), pattern=pattern)


def load_server_backend(url: str, model_dir, num_layers: int, api_key: str | None = None, in_flight: int = 1):
    """``(ServerBackend, tokenizer, config)``: a running patched server at ``url`` and the tokenizer and
    config of the checkpoint ``model_dir`` it serves."""
    from transformers import AutoConfig, AutoTokenizer

    from .server_backend import ServerBackend

    backend = ServerBackend(url, api_key=api_key, num_layers=num_layers, in_flight=in_flight)
    return backend, AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)


def load_data(args, tokenizer, config):
    """Token blocks of ``args.data`` for a model; DataError on anything unusable."""
    from .data import load_blocks

    checks.positive_ints({"--" + name.replace("_", "-"): getattr(args, name, None)
                          for name in ("seq_len", "max_tokens", "batch_size", "threads")})
    if tokenizer is None:
        raise DataError("the model directory has no tokenizer: cannot tokenize --data")
    seq_len = seq_len_for(config, args.seq_len)
    seed = getattr(args, "seed", None)
    blocks = load_blocks(args.data, tokenizer, seq_len, args.max_tokens, text_field=args.text_field, seed=seed)
    log.info("data: %s tokens in %d blocks of %d from %s (documents shuffled with seed %s)", blocks.tokens,
             blocks.input_ids.shape[0], seq_len, args.data, seed)
    return blocks
