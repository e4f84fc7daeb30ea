"""Greedy search for the F layers (the paper's training-free IndexCache), exact and cheaper.

Start from all F (every layer with an indexer); at each step try every current F layer except
layer 0 as S on the same cached calibration batches, commit the flip with the lowest mean LM loss
(ties: the lowest layer), stop when ``target_full(N, keep)`` F layers remain. Candidate losses
come from an evaluator (:mod:`.evaluators`): exact prefix reuse for the transformers backend,
whole forwards for a server.

Optional, result-changing speed-up: ``screen_batches`` ranks the candidates on the first batches
only and re-scores the best ``screen_top`` on all batches (the committed flip is the best of
those on the full set).

The state after every step is a plain dict (JSON-serialisable) so a run can resume and reach the
same pattern: the search is deterministic given the pattern reached.

The same search, with the evaluator's moves set to :class:`.moves.StrideMoves`, chooses per-layer
decode strides over a fixed pattern (raise one F layer's stride per step, the lowest loss wins,
until the effective stride reaches its target): :mod:`.stride_search`.
"""

from __future__ import annotations

import logging
import time

from .evaluators import PatternEvaluator, PrefixEvaluator

log = logging.getLogger(__name__)
STATE_FORMAT = "indexcache-greedy-state/v1"


def target_full(num_layers: int, keep: float) -> int:
    """Number of F layers to keep: ``round(keep * N)``, at least 1."""
    return max(1, int(round(keep * num_layers)))


def make_evaluator(backend, batches, tick=None, moves=None):
    """Prefix reuse when the backend has the layer-wise API, whole forwards otherwise.

    ``moves``: :class:`.moves.SharedMoves` (default, the keep search) or :class:`.moves.StrideMoves`.
    """
    if all(hasattr(backend, name) for name in ("begin", "layer", "end")):
        return PrefixEvaluator(backend, batches, tick, moves)
    return PatternEvaluator(backend, batches, tick, moves)


def new_state(keep: float, options: dict, start_pattern: str, **identity) -> dict:
    return {"format": STATE_FORMAT, "keep_ratio": keep, "start_pattern": start_pattern,
            "pattern": start_pattern, "baseline_loss": None, "steps": [], "layer_forwards": 0,
            "naive_layer_forwards": 0, "seconds": 0.0, "options": options, **identity}


def _rank(evaluator, candidates, batch_ids, step, progress_candidate):
    """Losses ``{j: (mean, nll, tokens)}`` of each candidate on ``batch_ids``, descending order.

    The running best candidate above j is where candidate j's state is kept for the next step.
    """
    results, best = {}, None
    for j in sorted(candidates, reverse=True):
        progress_candidate(j)
        result = evaluator.candidate(j, batch_ids, f"step {step}, {evaluator.moves.describe(j)}", save_at=best)
        results[j] = result
        if best is None or result[0] <= results[best][0]:  # '<=': a lower layer wins a tie
            best = j
    return results


def choose(results: dict) -> int:
    """The candidate with the lowest loss; ties go to the lowest layer."""
    return min(results, key=lambda j: (results[j][0], j))


def search_step(evaluator, state, num_batches, progress_candidate, screen_batches=None, screen_top=3):
    """One greedy step on ``evaluator`` (whose current plan is the one ``state`` holds)."""
    moves, step = evaluator.moves, len(state["steps"]) + 1
    candidates = moves.candidates(moves.plan_of(state))
    everything = list(range(num_batches))
    if screen_batches and screen_batches < num_batches and len(candidates) > screen_top:
        head, rest = everything[:screen_batches], everything[screen_batches:]
        ranked = _rank(evaluator, candidates, head, step, progress_candidate)
        finalists = sorted(ranked, key=lambda j: (ranked[j][0], j))[:screen_top]
        results = {}
        for j in sorted(finalists, reverse=True):
            progress_candidate(j)
            _, nll_rest, tok_rest = evaluator.candidate(j, rest, f"step {step}, {moves.describe(j)}")
            nll, tokens = ranked[j][1] + nll_rest, ranked[j][2] + tok_rest
            results[j] = (nll / tokens, nll, tokens)
    else:
        results = _rank(evaluator, candidates, everything, step, progress_candidate)
    chosen = choose(results)
    evaluator.commit(chosen)
    state["naive_layer_forwards"] += len(candidates) * evaluator.num_layers * num_batches
    moves.store(state, evaluator.plan)
    state["steps"].append({moves.step_key: chosen, "loss": results[chosen][0], **moves.record(evaluator.plan),
                           "candidates": {str(j): results[j][0] for j in sorted(results)}})
    return chosen


def run_search(evaluator, state, target: int, num_batches: int, on_step=None, bar=None,
               screen_batches=None, screen_top=3) -> dict:
    """Run (or resume) the search in ``state`` until ``moves.done(plan, target)`` (keep search:
    ``target`` F layers remain); returns ``state``.

    ``on_step(state)`` is called after every committed step (the caller writes it atomically);
    ``bar`` (optional) is a progress bar over steps with ``set_postfix_str``.
    """
    started, before = time.monotonic(), evaluator.layer_forwards
    n, moves = evaluator.num_layers, evaluator.moves
    if state["baseline_loss"] is None:
        state["baseline_loss"] = evaluator.reset(moves.plan_of(state), "step 0 (baseline)")
        state["naive_layer_forwards"] += n * num_batches
        log.info("baseline loss %.5f (%s)", state["baseline_loss"], moves.record(moves.plan_of(state)))
    else:
        loss = evaluator.reset(moves.plan_of(state), f"resume at step {len(state['steps'])}")
        expected = state["steps"][-1]["loss"] if state["steps"] else state["baseline_loss"]
        if abs(loss - expected) > 1e-6 * max(1.0, abs(expected)):
            log.warning("resumed pattern scores %.6f, the saved state says %.6f", loss, expected)
    state["layer_forwards"] += evaluator.layer_forwards - before
    before = evaluator.layer_forwards
    while not moves.done(moves.plan_of(state), target):
        step = len(state["steps"]) + 1

        def progress_candidate(j, step=step):
            if bar is not None:
                bar.set_postfix_str(f"step {step}: layer {j}")

        chosen = search_step(evaluator, state, num_batches, progress_candidate, screen_batches, screen_top)
        state["layer_forwards"] += evaluator.layer_forwards - before
        before = evaluator.layer_forwards
        state["seconds"] += time.monotonic() - started
        started = time.monotonic()
        # cumulative cost after this step (the search up to here is the search for that keep ratio)
        state["steps"][-1].update(layer_forwards=state["layer_forwards"], seconds=round(state["seconds"], 2),
                                  naive_layer_forwards=state["naive_layer_forwards"])
        log.info("step %d: %s, loss %.5f, %s", step, moves.describe(chosen), state["steps"][-1]["loss"],
                 moves.record(moves.plan_of(state)))
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(state)
    state["seconds"] += time.monotonic() - started
    return state


def final_loss(state) -> float:
    return state["steps"][-1]["loss"] if state["steps"] else state["baseline_loss"]
