"""Candidate results kept in the search state: resume inside a step, stop at a deadline, progress.

:class:`RecordingEvaluator` wraps either evaluator of :mod:`.evaluators`. Every candidate result
(mean loss, summed NLL, tokens, seconds) is stored in ``state["partial"]`` under the plan it was
measured from (``moves.record(plan)``: the pattern, or the per-layer decode strides), so a resumed
search re-uses the candidates an interrupted step had already scored
(a candidate's loss depends only on the plan and the data: re-using it changes nothing). The
entry is emptied when a move is committed. It also counts evaluations, keeps the step's best loss
for the progress line, and raises :class:`SearchStopped` before starting a new evaluation once
``deadline`` (``time.monotonic()``) has passed, which ``calibrate --max-seconds`` uses.
"""

from __future__ import annotations

import time



class SearchStopped(Exception):
    """The deadline passed; the state (with the step's scored candidates) is saved for ``--resume``."""

    def __init__(self, evaluations: int, seconds: float):
        super().__init__(f"stopped after {seconds:.0f} s and {evaluations} evaluations")
        self.evaluations, self.seconds = evaluations, seconds


def consistent(state: dict, moves) -> bool:
    """Whether ``state`` is whole (not caught between a commit and its step record)."""
    record = moves.record(moves.plan_of(state))
    if not state["steps"]:  # before the first step only the keep search's pattern can have moved
        return "pattern" not in record or record["pattern"] == state["start_pattern"]
    return all(state["steps"][-1].get(key) == value for key, value in record.items())


class RecordingEvaluator:
    """Evaluator wrapper: results recorded in ``state``, a deadline, counts for the progress line."""

    def __init__(self, inner, state: dict, num_batches: int, on_result=None, deadline: float | None = None):
        self.inner, self.state, self.num_batches = inner, state, num_batches
        self.on_result = on_result or (lambda: None)
        self.deadline, self.started = deadline, time.monotonic()
        self.evaluations = 0   # evaluations run by this process (re-used ones not counted)
        self.best = None       # (loss, move) of the best candidate of this step on all batches
        self.moves = inner.moves
        plan = self.moves.record(self.moves.plan_of(state))
        partial = state.get("partial")
        if not isinstance(partial, dict) or partial.get("plan") != plan:
            partial = {"plan": plan, "results": {}}
        state["partial"] = partial
        for key, entry in partial["results"].items():
            self._track(key, entry[0])

    def __getattr__(self, name):  # num_layers, layer_forwards, plan, batches ...
        return getattr(self.inner, name)

    def _key(self, j: int, batch_ids) -> str:
        return f"{j}:" + ",".join(map(str, batch_ids))

    def _track(self, key: str, loss: float) -> None:
        layer, batches = key.split(":")
        if len(batches.split(",")) == self.num_batches and (self.best is None or (loss, int(layer)) < self.best):
            self.best = (loss, int(layer))

    def reset(self, plan, what: str) -> float:
        started = time.monotonic()
        loss = self.inner.reset(plan, what)
        self.state["reset_seconds"] = round(time.monotonic() - started, 3)
        self.evaluations += 1
        return loss

    def candidate(self, j, batch_ids, what, save_at=None):
        batch_ids = list(batch_ids)
        key = self._key(j, batch_ids)
        results = self.state["partial"]["results"]
        if key in results:
            mean, nll, tokens = results[key][:3]
            return mean, nll, tokens
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise SearchStopped(self.evaluations, time.monotonic() - self.started)
        started = time.monotonic()
        result = self.inner.candidate(j, batch_ids, what, save_at=save_at)
        seconds = time.monotonic() - started
        results[key] = [result[0], result[1], result[2], round(seconds, 3)]
        self.evaluations += 1
        self.state["evaluations"] = self.state.get("evaluations", 0) + 1
        self.state["evaluation_seconds"] = round(self.state.get("evaluation_seconds", 0.0) + seconds, 3)
        self._track(key, result[0])
        self.on_result()
        return result

    def commit(self, j: int) -> None:
        self.inner.commit(j)
        self.state["partial"] = {"plan": self.moves.record(self.inner.plan), "results": {}}
        self.best = None

    def postfix(self) -> str:
        """``N evaluations, step best L (layer j S)`` for the progress line."""
        text = f"{self.state.get('evaluations', 0)} evaluations"
        if self.best is not None:
            text += f", step best {self.best[0]:.5f} ({self.moves.label(self.best[1])})"
        return text
