"""Chunked prefill stays correct: prompt log-probabilities of one long prompt, chunked and not.

One fixed prompt (``PROMPT_TOKENS`` random ids, the same on every server) goes to ``/generate`` with
``return_logprob`` and ``logprob_start_len`` 0; SGLang returns ``meta_info.input_token_logprobs``, one
``[logprob, token id, text]`` per prompt token (the first logprob is null). The references come from
a calibration-mode server whose chunk is larger than the prompt (one forward), under all-F and, after
a pattern switch, every-4; the bench servers (chunk 16384) and a second calibration server give the
chunked ones.

A comparison passes when the chunked log-probabilities equal the reference of the same pattern
within bf16 (``mean |diff| <= BF16_MEAN_TOL``) **and** the difference is at most
``1 / CONTROL_FACTOR`` of the control: every-4 against all-F, both unchunked. Random-weight models
give near-uniform log-probabilities, so a small difference alone proves little; the control shows
how far a change of the selected tokens moves them, which is what broken chunking (stale or wrong
top-k after a chunk boundary) would do. A control below ``CONTROL_FLOOR`` makes the check
inconclusive (reported, not passed).
"""

from __future__ import annotations

import random

PROMPT_TOKENS = 40_960  # 2.5 chunks of 16384
VOCAB = 4000
BF16_MEAN_TOL = 0.05  # nats: bf16 keeps 8 bits of mantissa (0.4% of a logit of 1-5) through 32 layers
CONTROL_FACTOR = 4.0
CONTROL_FLOOR = 1e-3


def prompt() -> list[int]:
    rng = random.Random("indexcache chunked-prefill check")
    return [rng.randrange(1, VOCAB) for _ in range(PROMPT_TOKENS)]


def prompt_logprobs(client, ids: list[int]) -> list[float | None]:
    """The log-probability of each prompt token under the server's model (index 0: None)."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0}
    reply = client.post_json("/generate", body)
    if isinstance(reply, list):
        reply = reply[0]
    entries = (reply.get("meta_info") or {}).get("input_token_logprobs")
    if not entries or len(entries) != len(ids):
        raise ValueError(f"expected {len(ids)} input_token_logprobs, got {len(entries or [])}")
    wrong = next((i for i, (e, t) in enumerate(zip(entries, ids)) if e[1] != t), None)
    if wrong is not None:
        raise ValueError(f"input_token_logprobs[{wrong}] is for token {entries[wrong][1]}, the prompt has {ids[wrong]}")
    return [None if e[0] is None else round(float(e[0]), 6) for e in entries]


def difference(reference: list, other: list, chunk: int = 16384) -> dict:
    """|reference - other| over the positions both give: mean, max, p99, and the mean per chunk."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} against {len(other)} positions")
    diffs = [(i, abs(a - b)) for i, (a, b) in enumerate(zip(reference, other)) if a is not None and b is not None]
    if not diffs:
        raise ValueError("no position with a log-probability on both sides")
    values = sorted(d for _, d in diffs)
    segments = []
    for start in range(0, len(reference), chunk):
        part = [d for i, d in diffs if start <= i < start + chunk]
        segments.append(sum(part) / len(part) if part else None)
    return {"positions": len(values), "mean_abs": sum(values) / len(values), "max_abs": values[-1],
            "p99_abs": values[min(len(values) - 1, int(0.99 * len(values)))], "segment_mean_abs": segments}


def verdict(diff: dict, control: dict | None) -> tuple[str, str]:
    """("pass" | "fail" | "inconclusive", why) for one chunked-vs-reference difference."""
    if diff["mean_abs"] > BF16_MEAN_TOL:
        return "fail", f"mean abs diff {diff['mean_abs']:.4f} > bf16 tolerance {BF16_MEAN_TOL}"
    if control is None:
        return "inconclusive", "no every-4 vs all-F control"
    if control["mean_abs"] < CONTROL_FLOOR:
        return "inconclusive", f"the control moves log-probabilities by only {control['mean_abs']:.2e}"
    if diff["mean_abs"] * CONTROL_FACTOR > control["mean_abs"]:
        return "fail", (f"mean abs diff {diff['mean_abs']:.4f} is more than 1/{CONTROL_FACTOR:.0f} of the control"
                        f" {control['mean_abs']:.4f}")
    if diff["max_abs"] == 0:
        return "pass", "identical log-probabilities"
    return "pass", (f"mean abs diff {diff['mean_abs']:.2e}: within bf16, {control['mean_abs'] / diff['mean_abs']:.0f}x"
                    " below the control")
