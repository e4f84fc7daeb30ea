"""TTFT and decode throughput of a running SGLang server (stdlib only: no torch, no SGLang import).

Requests go to SGLang's native ``POST /generate`` with ``input_ids`` and ``"stream": true``; the
server answers Server-Sent Events, one ``data: {json}`` line per step and ``data: [DONE]`` at the end::

    {"output_ids": [...], "meta_info": {"prompt_tokens": N, "completion_tokens": k, "cached_tokens": c, ...}}

(``output_ids`` is cumulative unless the server runs ``--incremental-streaming-output``; ``text`` is
absent under ``--skip-tokenizer-init``; an error arrives as ``data: {"error": {...}}``). Each request
records the time of every chunk and its ``completion_tokens``; the time to the first chunk with a token
is the TTFT, and the gaps between later chunks, split evenly over the tokens a chunk brought, are the
inter-token latencies (ITLs).

Prompts: every request gets its own random token ids, seeded by (seed, tag, phase, length, index),
and the first tokens of all requests of a run are distinct by construction, so no two requests share a
prefix and the radix cache cannot serve one from another (an earlier measurement's 200K prompt reused
a 128K one's cached prefix). ``meta_info.cached_tokens`` is recorded to show it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import random
import statistics
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """The server could not be reached or answered something that is not SGLang's /generate."""


@dataclass
class Sample:
    """One request: what was asked, when each chunk came, and what went wrong (``error``)."""

    prompt_len: int
    new_tokens: int
    first_token: int
    sent: float = 0.0  # perf_counter seconds
    chunks: list = field(default_factory=list)  # [(perf_counter, completion_tokens)]
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    def token_times(self) -> list[float]:
        """Arrival time of each generated token; a chunk of k tokens is spread evenly over its gap."""
        times, previous_t, previous_n = [], None, 0
        for t, n in self.chunks:
            k = n - previous_n
            if k <= 0:
                continue
            if previous_t is None:
                times += [t] * k
            else:
                times += [previous_t + (t - previous_t) * (j + 1) / k for j in range(k)]
            previous_t, previous_n = t, n
        return times

    def to_json(self, origin: float) -> dict:
        times = self.token_times()
        return {"prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "first_token": self.first_token,
                "ok": self.ok, "error": self.error, "ttft_s": self.ttft,
                "completion_tokens": self.chunks[-1][1] if self.chunks else 0,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "sent_s": self.sent - origin, "token_times_s": [t - origin for t in times]}


def request_seed(seed: int, tag: str, phase: str, length: int, index: int) -> int:
    key = f"{seed}|{tag}|{phase}|{length}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


class PromptMaker:
    """Random prompts whose first tokens are all different (so no two share a prefix).

    The first tokens are a fixed permutation of the vocabulary (seeded by seed and tag); prompt i of
    this maker takes entry ``start + i``, so runs of one tag with disjoint ``[start, start +
    capacity)`` ranges (the parts of one server's measurement) share no first token either.
    """

    def __init__(self, seed: int, tag: str, vocab: int, capacity: int, start: int = 0):
        if start + capacity >= vocab - 1:
            raise ValueError(f"{start + capacity} prompts need a vocabulary of more than {start + capacity + 1} ids")
        self.seed, self.tag, self.vocab = seed, tag, vocab
        order = list(range(1, vocab))
        random.Random(request_seed(seed, tag, "first-tokens", 0, 0)).shuffle(order)
        self._firsts = order[start:start + capacity]
        self._used: set[int] = set()

    def make(self, phase: str, length: int, index: int) -> list[int]:
        first = self._firsts[len(self._used)]
        if first in self._used:  # the permutation above makes this impossible; keep the promise checked
            raise AssertionError(f"prompt {phase}/{length}/{index} would share its first token {first}")
        self._used.add(first)
        rng = random.Random(request_seed(self.seed, self.tag, phase, length, index))
        return [first] + [rng.randrange(1, self.vocab) for _ in range(length - 1)]


class Client:
    """A minimal SGLang HTTP client: ``/health``, ``/server_info`` and streamed ``/generate``."""

    def __init__(self, url: str, timeout_s: float = 900.0, api_key: str | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url {url!r} is not an http(s)://HOST[:PORT] address")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"--url {url!r} has a bad port") from None
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, port
        self.base = parts.path.rstrip("/")
        self.timeout_s, self.api_key = timeout_s, api_key

    def _connect(self, timeout: float):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def get_json(self, path: str, timeout: float = 10.0):
        return self._parse(self.request("GET", path, None, timeout))

    def get_text(self, path: str, timeout: float = 10.0) -> str:
        """A plain-text answer (e.g. Prometheus ``/metrics``); raises ServeError unless 200."""
        return self.request("GET", path, None, timeout)

    def post_json(self, path: str, body: dict, timeout: float | None = None):
        """One non-streamed request (e.g. ``/generate`` with ``return_logprob``); raises ServeError unless 200."""
        return self._parse(self.request("POST", path, body, self.timeout_s if timeout is None else timeout))

    def request(self, method: str, path: str, body, timeout: float) -> str:
        conn = self._connect(timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, self.base + path, body=data, headers=self._headers())
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise ServeError(f"cannot reach {self.scheme}://{self.host}:{self.port}{path}: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise ServeError(f"{method} {path}: HTTP {response.status}: {text[:200]}")
        return text

    @staticmethod
    def _parse(text: str):
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"text": text[:200]}

    def generate(self, sample: Sample, input_ids: list[int]) -> Sample:
        """Send one streamed request; fills ``sample`` in place and never raises for server errors."""
        payload = {"input_ids": input_ids, "stream": True,
                   "sampling_params": {"max_new_tokens": sample.new_tokens, "temperature": 0.0,
                                       "ignore_eos": True}}
        body = json.dumps(payload).encode()
        conn = self._connect(self.timeout_s)
        sample.sent = time.perf_counter()
        try:
            conn.request("POST", self.base + "/generate", body=body, headers=self._headers())
            response = conn.getresponse()
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {response.read()[:200].decode('utf-8', 'replace')}"
                return sample
            self._read_stream(response, sample, sample.sent + self.timeout_s)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if sample.ok:
            _check_counts(sample)
        return sample

    @staticmethod
    def _read_stream(response, sample: Sample, deadline: float) -> None:
        counted = 0
        while True:
            if time.perf_counter() > deadline:
                sample.error = f"timed out: still streaming after {deadline - sample.sent:.0f} s"
                return
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                sample.error = f"server error: {json.dumps(event['error'])[:200]}"
                return
            meta = event.get("meta_info") or {}
            n = meta.get("completion_tokens")
            if n is None:  # incremental output without a count: add this chunk's ids
                n = counted + len(event.get("output_ids") or [])
            if n > counted:
                sample.chunks.append((time.perf_counter(), int(n)))
                counted = int(n)
            sample.prompt_tokens = meta.get("prompt_tokens", sample.prompt_tokens)
            sample.cached_tokens = meta.get("cached_tokens", sample.cached_tokens)


def _check_counts(sample: Sample) -> None:
    got = sample.chunks[-1][1] if sample.chunks else 0
    if got != sample.new_tokens:
        sample.error = f"returned {got} of {sample.new_tokens} tokens"
    elif sample.prompt_tokens is not None and sample.prompt_tokens != sample.prompt_len:
        sample.error = f"server counted {sample.prompt_tokens} prompt tokens, sent {sample.prompt_len}"


def run_concurrent(client: Client, jobs: list[tuple[Sample, list[int]]]) -> list[Sample]:
    """Send all jobs at once (one thread each, released together) and wait for every one."""
    barrier = threading.Barrier(len(jobs))

    def work(sample, ids):
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        client.generate(sample, ids)

    threads = [threading.Thread(target=work, args=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [sample for sample, _ in jobs]


def decode_stats(samples: list[Sample]) -> dict:
    """Steady-state decode: tokens after each request's first, inside the window where all ran.

    The window opens when the last request got its first token (every prefill is done) and closes
    when the first request got its last token; ``tok_s`` counts every token that arrived inside it
    over its length, ``tok_s_median_itl`` is ``B / median ITL`` there (robust to a stall).
    """
    done = [s for s in samples if s.ok and len(s.chunks) > 1]
    out = {"requests": len(samples), "measured": len(done), "window_s": None, "tok_s": None,
           "tok_s_median_itl": None, "itl_median_s": None, "itl_p90_s": None, "itl_mean_s": None,
           "window_tokens": 0}
    if not done:
        return out
    times = [s.token_times() for s in done]
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    itls = [b - a for t in times for a, b in zip(t, t[1:]) if a >= start and b <= end]
    tokens = sum(1 for t in times for x in t[1:] if start < x <= end)
    if end <= start or not itls:
        out["note"] = "the requests never all decoded at once (no common window)"
        return out
    itls.sort()
    out.update(window_s=end - start, window_tokens=tokens, tok_s=tokens / (end - start),
               itl_median_s=statistics.median(itls), itl_mean_s=statistics.fmean(itls),
               itl_p90_s=itls[min(len(itls) - 1, int(0.9 * len(itls)))])
    out["tok_s_median_itl"] = len(done) / out["itl_median_s"] if out["itl_median_s"] > 0 else None
    return out


def summary(values: list[float]) -> dict:
    return {"min": min(values) if values else None, "median": statistics.median(values) if values else None}
