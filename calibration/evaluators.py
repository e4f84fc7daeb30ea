"""Loss of candidate patterns for the greedy search: exact prefix reuse, or whole forwards.

:class:`PrefixEvaluator` (a backend with the layer-wise API) keeps, per calibration batch, the state
entering every layer under the current pattern (hidden ``[B, S, hidden]`` + carried top-k
``[B, S, k]``). Flipping layer j to S cannot change anything before layer j, so candidate j runs
layers j..N-1 only. It also keeps, per candidate j, the state entering one later layer L (the best
candidate above j so far, evaluated in descending order): if the step commits a flip at a layer
>= L, that state stays valid for candidate j's next evaluation, which then starts at L.
Results are bit-identical to whole forwards (the same layer operations on the same inputs).

Memory: ``(N + 1 + C) * tokens * hidden`` values of the model dtype (C candidates), plus a top-k
``[tokens, k]`` int32 per F layer. For the embedded model at 32K tokens this is a few hundred MB.
For a large model keep ``--max-tokens`` modest or use the ``--url`` backend, which evaluates whole
forwards (no cache, naive cost).

:class:`PatternEvaluator` (any backend with ``set_pattern`` + per-batch scoring, e.g. an SGLang
server) evaluates every candidate with whole forwards; a backend with ``batches_nll`` (the server
backend) gets all of a candidate's batches in one call, to keep several requests in flight.

Cost is counted in layer-forwards: one decoder layer applied to one batch.
"""

from __future__ import annotations

import math

import torch

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import UsageError


class NonFiniteLossError(UsageError):
    """A NaN or infinite loss / hidden state during the search (names the step and layer)."""


def flip(pattern: str, j: int) -> str:
    return pattern[:j] + pat.SHARED + pattern[j + 1:]


def check_finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what}: the loss is {value}; the model or data give non-finite values")
    return value


class _Evaluator:
    """State both evaluators share: the backend, the batches, the current pattern, a work count."""

    def __init__(self, backend, batches, tick=None):
        self.backend, self.batches = backend, list(batches)
        self.num_layers = backend.num_layers
        self.layer_forwards = 0
        self.tick = tick or (lambda: None)
        self.pattern = None


class PatternEvaluator(_Evaluator):
    """Whole forwards per candidate through ``backend.set_pattern`` + ``backend.batch_nll``."""

    def reset(self, pattern: str, what: str) -> float:
        """Make ``pattern`` current; returns its loss."""
        self.pattern = pattern
        return self.loss_of(pattern, range(len(self.batches)), what)[0]

    def loss_of(self, pattern, batch_ids, what):
        """Sums in batch order whether or not the backend keeps several requests in flight."""
        self.backend.set_pattern(pattern)
        batch_ids = list(batch_ids)
        nll, tokens = 0.0, 0

        def done(i, result):
            self.layer_forwards += self.num_layers
            self.tick()
            check_finite(result[0], f"{what} (batch {batch_ids[i]})")

        if hasattr(self.backend, "batches_nll"):
            results = self.backend.batches_nll([self.batches[b] for b in batch_ids], on_done=done)
        else:
            results = []
            for i, b in enumerate(batch_ids):
                results.append(self.backend.batch_nll(self.batches[b]))
                done(i, results[-1])
        for part, count in results:
            nll, tokens = nll + part, tokens + count
        return nll / tokens, nll, tokens

    def candidate(self, j, batch_ids, what, save_at=None):
        """``(mean, nll_sum, tokens)`` of the current pattern with layer ``j`` made S."""
        return self.loss_of(flip(self.pattern, j), batch_ids, what)

    def commit(self, j: int) -> None:
        self.pattern = flip(self.pattern, j)


class PrefixEvaluator(_Evaluator):
    """Exact candidate losses with cached per-layer states (see the module docstring)."""

    def __init__(self, backend, batches, tick=None):
        super().__init__(backend, batches, tick)
        self.main = []    # [batch][layer 0..N] LayerState entering that layer (N: after the last)
        self.saved = {}   # candidate j -> {batch: (L, LayerState entering L with j shared)}

    def _run(self, b, state, start, pattern, what, save_at=None, keep=None):
        """Layers ``start..N-1`` of batch ``b`` under ``pattern``; returns (nll, tokens, saved)."""
        saved = None
        for i in range(start, self.num_layers):
            if i == save_at:
                saved = state
            if keep is not None:
                keep.append(state)
            state = self.backend.layer(i, state, pattern[i] == pat.FULL)
            self.layer_forwards += 1
            if not bool(torch.isfinite(state.hidden).all()):
                raise NonFiniteLossError(f"{what}: layer {i} produced non-finite hidden states (batch {b})")
        if keep is not None:
            keep.append(state)
        nll, tokens = self.backend.end(state, self.batches[b])
        check_finite(nll, f"{what} (batch {b})")
        return nll, tokens, saved

    def reset(self, pattern: str, what: str) -> float:
        """Forward every batch under ``pattern``, caching the states; returns its loss."""
        self.pattern, self.main, self.saved = pattern, [], {}
        nll_sum, tokens = 0.0, 0
        for b, ids in enumerate(self.batches):
            states = []
            nll, count, _ = self._run(b, self.backend.begin(ids), 0, pattern, what, keep=states)
            self.main.append(states)
            nll_sum, tokens = nll_sum + nll, tokens + count
            self.tick()
        return nll_sum / tokens

    def candidate(self, j, batch_ids, what, save_at=None):
        """``(mean, nll_sum, tokens)`` of the current pattern with layer ``j`` S, on ``batch_ids``.

        ``save_at`` (> j) asks to keep the state entering that layer for candidate j's next step.
        """
        pattern = flip(self.pattern, j)
        entries = self.saved.setdefault(j, {})
        nll_sum, tokens = 0.0, 0
        for b in batch_ids:
            start, state = entries.get(b, (j, None))
            if state is None:
                start, state = j, self.main[b][j]
            wanted = save_at if save_at is not None and save_at > start else None
            nll, count, saved = self._run(b, state, start, pattern, what, save_at=wanted)
            if saved is not None:
                entries[b] = (wanted, saved)
            nll_sum, tokens = nll_sum + nll, tokens + count
            self.tick()
        return nll_sum / tokens, nll_sum, tokens

    def commit(self, j: int) -> None:
        """Make layer ``j`` S: recompute the cached states after it; drop invalid saved states."""
        self.pattern = flip(self.pattern, j)
        for b in range(len(self.batches)):
            states = self.main[b][: j + 1]
            self._run(b, states[j], j, self.pattern, f"commit of layer {j}", keep=(tail := []))
            self.main[b] = states + tail[1:]
        self.saved.pop(j, None)
        for cand, entries in self.saved.items():
            # a state entering L stays valid only if the committed flip is at or after L
            self.saved[cand] = {b: e for b, e in entries.items() if e[0] <= j}
