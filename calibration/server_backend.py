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
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import UsageError

from sglang_indexcache.models.lm_loss import LossResult, summed_loss

log = logging.getLogger(__name__)


class ServerError(UsageError):
    """The server is unreachable, refused the request, or answered something unusable."""


class ServerBackend:
    """Switch patterns and score token blocks on a running, patched SGLang server."""

    def __init__(self, url: str, api_key: str | None = None, num_layers: int | None = None,
                 timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.api_key, self.timeout_s = api_key, timeout_s
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

    def _request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
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
        answer = self._request("POST", "/index_cache/pattern", {"pattern": pattern})
        if not isinstance(answer, dict) or answer.get("pattern") != pattern:
            raise ServerError(f"the server did not switch to {pattern}: it answered {answer!r}")
        self.pattern = pattern
        return pattern

    def batch_nll(self, input_ids) -> tuple[float, int]:
        """Summed NLL and predicted-token count of ``input_ids [B, S]`` under the server's pattern."""
        rows = [list(map(int, row)) for row in input_ids.tolist()]
        body = {"input_ids": rows, "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        outputs = self._request("POST", "/generate", body)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        if len(outputs) != len(rows):
            raise ServerError(f"/generate returned {len(outputs)} outputs for {len(rows)} prompts")
        nll, tokens = 0.0, 0
        for row, output in zip(rows, outputs):
            entries = (output.get("meta_info") or {}).get("input_token_logprobs")
            if not isinstance(entries, list) or len(entries) != len(row):
                raise ServerError("/generate gave no prompt log-probabilities for every token"
                                  " (return_logprob with logprob_start_len 0)")
            for position, entry in enumerate(entries):
                logprob, token = entry[0], entry[1]
                # SGLang reports ids >= vocab_size - 1 as 0 (its image-hash clipping)
                if token != row[position] and token != 0:
                    raise ServerError(f"/generate scored token {token} at position {position}, sent {row[position]}")
                if logprob is None:
                    continue
                nll -= float(logprob)
                tokens += 1
        return nll, tokens

    def loss(self, blocks, batch_size: int = 4, progress=None) -> LossResult:
        return summed_loss(self.batch_nll, blocks, batch_size, progress)
