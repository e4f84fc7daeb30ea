"""Calibration backend over a patched SGLang server in calibration mode (``--index-cache-calibration``).

Endpoints (DESIGN.md): ``GET /index_cache`` (``{"pattern", "num_layers", "calibration", ...}``),
``POST /index_cache/pattern {"pattern": P}`` (switches between batches, flushes the prefix cache).
Losses come from SGLang's native ``POST /generate`` with prompt log-probabilities
(``io_struct.GenerateReqInput`` of SGLang 0.5.23)::

    {"input_ids": [[...], ...], "return_logprob": true, "logprob_start_len": 0,
     "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}

Each output's ``meta_info.input_token_logprobs`` is a list of ``[logprob, token_id, text]``, one per
prompt token; the first token's logprob is ``null`` (nothing predicts it). The NLL of a block is
``-sum`` of the others, so a block of S tokens predicts S - 1, as in the transformers backend.
Keys go in ``Authorization: Bearer KEY``. No layer-wise API: the greedy search does whole forwards.

``in_flight`` > 1 keeps that many ``/generate`` requests of one pattern in flight
(:meth:`ServerBackend.batches_nll`), so the server's scheduler queues the next batch while the
previous one's log-probabilities travel back; the switch to the next pattern waits for all of them.
The per-stage times of every call are summed in :attr:`ServerBackend.timings` (docs/perf.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import UsageError

from sglang_indexcache.models.lm_loss import LossResult, summed_loss

log = logging.getLogger(__name__)


class ServerError(UsageError):
    """The server is unreachable, refused the request, or answered something unusable."""


@dataclass
class ServerTimings:
    """Seconds spent per stage, summed over calls (client clock; ``server_s`` from the replies).

    ``switch_s``: ``POST /index_cache/pattern`` round trips (the scheduler waits until idle, switches,
    flushes the prefix cache). ``request_s``: ``/generate`` round trips, from sending the body to
    having read the reply; ``server_s``: the part of them inside SGLang (each reply's largest
    ``meta_info.e2e_latency``: tokenizer manager, scheduler queue, forward, log-prob output);
    ``encode_s`` / ``decode_s`` / ``score_s``: the client's JSON encoding, JSON parsing and NLL sum.
    ``wall_s``: wall time of the batch calls (below the summed request time when requests overlap).
    """

    switches: int = 0
    switch_s: float = 0.0
    requests: int = 0
    request_s: float = 0.0
    server_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    score_s: float = 0.0
    wall_s: float = 0.0
    prompt_tokens: int = 0
    reply_bytes: int = 0

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def add(self, other: dict) -> None:
        for key, value in other.items():
            if hasattr(self, key):
                setattr(self, key, getattr(self, key) + value)


class ServerBackend:
    """Switch patterns and score token blocks on a running, patched SGLang server."""

    def __init__(self, url: str, api_key: str | None = None, num_layers: int | None = None,
                 timeout_s: float = 600.0, in_flight: int = 1):
        self.url = url.rstrip("/")
        self.api_key, self.timeout_s, self.in_flight = api_key, timeout_s, max(1, int(in_flight))
        self.timings = ServerTimings()
        self._lock = threading.Lock()
        info = self._request("GET", "/index_cache")
        if not isinstance(info, dict) or "pattern" not in info:
            raise ServerError(f"{self.url}/index_cache answered {info!r}: not a patched SGLang server")
        if not info.get("calibration"):
            raise ServerError(f"{self.url} is not in calibration mode: start it with --index-cache-calibration")
        self.num_layers = int(info.get("num_layers") or len(info["pattern"]))
        if num_layers is not None and num_layers != self.num_layers:
            raise ServerError(f"the server's model has {self.num_layers} DSA layers, --model has {num_layers}")
        self.pattern = info["pattern"]
        self.start_pattern = pat.FULL * self.num_layers

    def _request(self, method: str, path: str, body=None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
            return payload if raw else json.loads(payload.decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            if exc.code in (401, 403):
                raise ServerError(f"{method} {self.url}{path}: HTTP {exc.code}: the server needs its API/admin key"
                                  " (--api-key or $INDEXCACHE_API_KEY)") from exc
            raise ServerError(f"{method} {self.url}{path}: HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"cannot reach {self.url}{path}: {getattr(exc, 'reason', exc)}") from exc
        except ValueError as exc:
            raise ServerError(f"{method} {self.url}{path} did not answer JSON: {exc}") from exc

    def set_pattern(self, pattern: str) -> str:
        pattern = pat.validate(pattern, self.num_layers)
        if pattern == self.pattern:
            return pattern
        started = time.perf_counter()
        answer = self._request("POST", "/index_cache/pattern", {"pattern": pattern})
        self.timings.switches += 1
        self.timings.switch_s += time.perf_counter() - started
        if not isinstance(answer, dict) or answer.get("pattern") != pattern:
            raise ServerError(f"the server did not switch to {pattern}: it answered {answer!r}")
        self.pattern = pattern
        return pattern

    def batch_nll(self, input_ids) -> tuple[float, int]:
        """Summed NLL and predicted-token count of ``input_ids [B, S]`` under the server's pattern."""
        started = time.perf_counter()
        try:
            return self._score(input_ids)
        finally:
            self.timings.wall_s += time.perf_counter() - started

    def batches_nll(self, batches, on_done=None) -> list[tuple[float, int]]:
        """:meth:`batch_nll` of each batch, ``in_flight`` requests at a time; results in order.

        ``on_done(i, result)`` is called in batch order as results arrive. The first failure is
        raised once the requests already sent have ended.
        """
        batches = list(batches)
        started = time.perf_counter()
        try:
            if self.in_flight == 1 or len(batches) == 1:
                results = []
                for i, ids in enumerate(batches):
                    results.append(self._score(ids))
                    if on_done:
                        on_done(i, results[-1])
                return results
            with ThreadPoolExecutor(max_workers=min(self.in_flight, len(batches))) as pool:
                futures = [pool.submit(self._score, ids) for ids in batches]
                try:
                    results = []
                    for i, future in enumerate(futures):
                        results.append(future.result())
                        if on_done:
                            on_done(i, results[-1])
                    return results
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            self.timings.wall_s += time.perf_counter() - started

    def _score(self, input_ids) -> tuple[float, int]:
        t0 = time.perf_counter()
        rows = [list(map(int, row)) for row in input_ids.tolist()]
        body = {"input_ids": rows, "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        t1 = time.perf_counter()
        payload = self._request("POST", "/generate", body, raw=True)
        t2 = time.perf_counter()
        try:
            outputs = json.loads(payload.decode("utf-8"))
        except ValueError as exc:
            raise ServerError(f"POST {self.url}/generate did not answer JSON: {exc}") from exc
        t3 = time.perf_counter()
        nll, tokens, server_s = self._sum_logprobs(rows, outputs)
        t4 = time.perf_counter()
        stats = {"requests": 1, "encode_s": t1 - t0, "request_s": t2 - t1, "decode_s": t3 - t2,
                 "score_s": t4 - t3, "server_s": server_s, "prompt_tokens": sum(map(len, rows)),
                 "reply_bytes": len(payload)}
        with self._lock:  # requests in flight add from several threads
            self.timings.add(stats)
        return nll, tokens

    @staticmethod
    def _sum_logprobs(rows, outputs) -> tuple[float, int, float]:
        outputs = outputs if isinstance(outputs, list) else [outputs]
        if len(outputs) != len(rows):
            raise ServerError(f"/generate returned {len(outputs)} outputs for {len(rows)} prompts")
        nll, tokens, server_s = 0.0, 0, 0.0
        for row, output in zip(rows, outputs):
            meta = output.get("meta_info") or {}
            entries = meta.get("input_token_logprobs")
            if not isinstance(entries, list) or len(entries) != len(row):
                raise ServerError("/generate gave no prompt log-probabilities for every token"
                                  " (return_logprob with logprob_start_len 0)")
            server_s = max(server_s, float(meta.get("e2e_latency") or 0.0))
            for position, entry in enumerate(entries):
                logprob, token = entry[0], entry[1]
                # SGLang reports ids >= vocab_size - 1 as 0 (its image-hash clipping)
                if token != row[position] and token != 0:
                    raise ServerError(f"/generate scored token {token} at position {position}, sent {row[position]}")
                if logprob is None:
                    continue
                nll -= float(logprob)
                tokens += 1
        return nll, tokens, server_s

    def loss(self, blocks, batch_size: int = 4, progress=None) -> LossResult:
        return summed_loss(self.batch_nll, blocks, batch_size, progress)
