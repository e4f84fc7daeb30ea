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

What a candidate changes comes from a moves object (:mod:`.moves`): the keep search's F -> S
flips (default) or the decode-stride search's raises; the evaluators hold a *plan* (the pattern, or
the per-layer strides) and never look inside it.
"""

from __future__ import annotations

import math

import torch

from sglang_indexcache.errors import UsageError

from .moves import SharedMoves


class NonFiniteLossError(UsageError):
    """A NaN or infinite loss / hidden state during the search (names the step and layer)."""


def check_finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what}: the loss is {value}; the model or data give non-finite values")
    return value


class _Evaluator:
    """State both evaluators share: the backend, the batches, the moves, the current plan, a work count."""

    def __init__(self, backend, batches, tick=None, moves=None):
        self.backend, self.batches = backend, list(batches)
        self.moves = moves or SharedMoves()
        self.num_layers = backend.num_layers
        self.layer_forwards = 0
        self.tick = tick or (lambda: None)
        self.plan = None


class PatternEvaluator(_Evaluator):
    """Whole forwards per candidate through ``moves.apply`` (``backend.set_pattern``) + ``backend.batch_nll``."""

    def reset(self, plan, what: str) -> float:
        """Make ``plan`` current; returns its loss."""
        self.plan = plan
        return self.loss_of(plan, range(len(self.batches)), what)[0]

    def loss_of(self, plan, batch_ids, what):
        """Sums in batch order whether or not the backend keeps several requests in flight."""
        self.moves.apply(self.backend, plan)
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
        """``(mean, nll_sum, tokens)`` of the current plan with move ``j`` (layer ``j`` made S)."""
        return self.loss_of(self.moves.move(self.plan, j), batch_ids, what)

    def commit(self, j: int) -> None:
        self.plan = self.moves.move(self.plan, j)


class PrefixEvaluator(_Evaluator):
    """Exact candidate losses with cached per-layer states (see the module docstring)."""

    def __init__(self, backend, batches, tick=None, moves=None):
        super().__init__(backend, batches, tick, moves)
        self.main = []    # [batch][layer 0..N] LayerState entering that layer (N: after the last)
        self.saved = {}   # candidate j -> {batch: (L, LayerState entering L with j shared)}

    def _run(self, b, state, start, plan, what, save_at=None, keep=None):
        """Layers ``start..N-1`` of batch ``b`` under ``plan``; returns (nll, tokens, saved)."""
        saved = None
        for i in range(start, self.num_layers):
            if i == save_at:
                saved = state
            if keep is not None:
                keep.append(state)
            state = self.backend.layer(i, state, **self.moves.layer_args(plan, i))
            self.layer_forwards += 1
            if not bool(torch.isfinite(state.hidden).all()):
                raise NonFiniteLossError(f"{what}: layer {i} produced non-finite hidden states (batch {b})")
        if keep is not None:
            keep.append(state)
        nll, tokens = self.backend.end(state, self.batches[b])
        check_finite(nll, f"{what} (batch {b})")
        return nll, tokens, saved

    def reset(self, plan, what: str) -> float:
        """Forward every batch under ``plan``, caching the states; returns its loss."""
        self.plan, self.main, self.saved = plan, [], {}
        nll_sum, tokens = 0.0, 0
        for b, ids in enumerate(self.batches):
            states = []
            nll, count, _ = self._run(b, self.backend.begin(ids), 0, plan, what, keep=states)
            self.main.append(states)
            nll_sum, tokens = nll_sum + nll, tokens + count
            self.tick()
        return nll_sum / tokens

    def candidate(self, j, batch_ids, what, save_at=None):
        """``(mean, nll_sum, tokens)`` of the current plan with move ``j``, on ``batch_ids``.

        ``save_at`` (> j) asks to keep the state entering that layer for candidate j's next step.
        """
        plan = self.moves.move(self.plan, j)
        entries = self.saved.setdefault(j, {})
        nll_sum, tokens = 0.0, 0
        for b in batch_ids:
            start, state = entries.get(b, (j, None))
            if state is None:
                start, state = j, self.main[b][j]
            wanted = save_at if save_at is not None and save_at > start else None
            nll, count, saved = self._run(b, state, start, plan, what, save_at=wanted)
            if saved is not None:
                entries[b] = (wanted, saved)
            nll_sum, tokens = nll_sum + nll, tokens + count
            self.tick()
        return nll_sum / tokens, nll_sum, tokens

    def commit(self, j: int) -> None:
        """Apply move ``j``: recompute the cached states after it; drop invalid saved states."""
        self.plan = self.moves.move(self.plan, j)
        for b in range(len(self.batches)):
            states = self.main[b][: j + 1]
            self._run(b, states[j], j, self.plan, f"commit of layer {j}", keep=(tail := []))
            self.main[b] = states + tail[1:]
        self.saved.pop(j, None)
        for cand, entries in self.saved.items():
            # a state entering L stays valid only if the committed flip is at or after L
            self.saved[cand] = {b: e for b, e in entries.items() if e[0] <= j}
