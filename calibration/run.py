"""``indexcache calibrate`` as a library call: resumable greedy search -> pattern file + plot.

The search state is written atomically to ``OUT.state.json`` after every step; ``resume=True``
continues from it (same model fingerprint, data hash, keep ratio and options required) and reaches
the same pattern. The state file is removed once the pattern file is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from sglang_indexcache import pattern as pat
from sglang_indexcache import pattern_file, progress
from sglang_indexcache.atomic import atomic_write_text
from sglang_indexcache.errors import UsageError

from . import greedy
from .moves import SharedMoves
from .paths import plot_path, state_path  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def expected_ticks(num_full: int, target: int, num_batches: int, screen_batches=None, screen_top=3) -> int:
    """Candidate x batch evaluations left: the (re)start forward, then every step's candidates."""
    ticks = num_batches
    for full in range(num_full, target, -1):
        candidates = full - 1  # every F layer but layer 0
        if screen_batches and screen_batches < num_batches and candidates > screen_top:
            ticks += candidates * screen_batches + screen_top * (num_batches - screen_batches)
        else:
            ticks += candidates * num_batches
    return ticks


def _identity(info, blocks, batch_size, start_pattern) -> dict:
    return {"model_fingerprint": info.fingerprint(), "num_layers": info.num_dsa_layers,
            "data": blocks.describe(), "batch_size": batch_size, "start_pattern": start_pattern}


def load_or_create_state(out, resume: bool, keep: float, options: dict, identity: dict) -> dict:
    path = state_path(out)
    if not path.exists():
        if resume:
            log.info("--resume: no saved state %s; starting from all F", path)
        return greedy.new_state(keep, options, **identity)
    if not resume:
        raise UsageError(f"{path} holds an interrupted search: pass --resume to continue it, or delete it")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the saved search state {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != greedy.STATE_FORMAT:
        raise UsageError(f"{path} is not a {greedy.STATE_FORMAT} file")
    wanted = {"keep_ratio": keep, "options": options, **identity}
    for key, value in wanted.items():
        if state.get(key) != value:
            raise UsageError(
                f"cannot resume {path}: its {key} is {state.get(key)!r} but this run has {value!r}"
                " (same model, data, --keep, --batch-size and options are required)"
            )
    log.info("resuming %s at step %d: %s", path, len(state["steps"]), state["pattern"])
    return state


def uniform_at(num_layers: int, keep: float) -> str:
    """The uniform pattern for a keep ratio: every ``round(1/keep)``-th layer F."""
    return pat.uniform(num_layers, max(1, int(round(1.0 / keep))))


def calibrate(backend, blocks, info, keep: float, out, resume=False, batch_size=4, screen_batches=None,
              screen_top=3, plot=True, on_step=None) -> dict:
    """Run the greedy search and write the pattern file ``out`` (+ :func:`plot_path` beside it).

    ``backend``: TransformersBackend (prefix reuse) or a server backend (whole forwards);
    ``blocks``: TokenBlocks; ``info``: ModelInfo. Returns the pattern-file document.
    """
    if not 0.0 < keep <= 1.0:
        raise UsageError(f"--keep must be in (0, 1], got {keep}")
    start = backend.start_pattern  # all F (every layer with an indexer)
    options = {"screen_batches": screen_batches, "screen_top": screen_top if screen_batches else None}
    identity = _identity(info, blocks, batch_size, start)
    state = load_or_create_state(out, resume, keep, options, identity)
    batches = list(blocks.batches(batch_size))
    target = greedy.target_full(backend.num_layers, keep)
    ticks = expected_ticks(state["pattern"].count(pat.FULL), target, len(batches), screen_batches, screen_top)
    steps_total = max(0, state["start_pattern"].count(pat.FULL) - target)
    search(backend, batches, state, target, out, SharedMoves(), ticks, steps_total, f"greedy keep {keep:g}",
           screen_batches, screen_top, on_step)
    uniform = uniform_at(backend.num_layers, keep)
    uniform_loss = evaluator_loss(backend, batches, uniform)
    document = pattern_file.make_document(
        state["pattern"], info, method="greedy", keep_ratio=keep, data=blocks.describe(),
        baseline_loss=state["baseline_loss"], loss=greedy.final_loss(state),
        steps=[{k: s[k] for k in ("removed", "loss", "pattern", "layer_forwards", "naive_layer_forwards", "seconds")
               if k in s} for s in state["steps"]],
        layer_forwards=state["layer_forwards"], naive_layer_forwards=state["naive_layer_forwards"],
        uniform={"pattern": uniform, "loss": uniform_loss}, batch_size=batch_size,
        seq_len=int(blocks.input_ids.shape[1]), options=options, seconds=round(state["seconds"], 2),
        backend=type(backend).__name__,
    )
    pattern_file.write(out, document)
    state_path(out).unlink(missing_ok=True)
    if plot:
        from .plots import plot_calibration

        plot_calibration(document, plot_path(out))
    return document


def search(backend, batches, state, target, out, moves, ticks, steps_total, desc, screen_batches=None,
           screen_top=3, on_step=None) -> dict:
    """:func:`greedy.run_search` with progress bars, the state saved atomically to ``OUT.state.json``
    after every step (``on_step(state)`` called after it), and a resume hint on interruption."""
    side = state_path(out)

    def save(current):
        atomic_write_text(side, json.dumps(current, indent=1) + "\n")
        if on_step is not None:
            on_step(current)

    candidates_bar = progress.bar(total=ticks, desc="candidates x batches", unit="fwd", position=1)
    evaluator = greedy.make_evaluator(backend, batches, tick=lambda: candidates_bar.update(1), moves=moves)
    steps_bar = progress.bar(total=steps_total, initial=len(state["steps"]), desc=desc, unit="step", position=0,
                             log_lines=False)

    def postfix(text):  # the step and candidate on both bars: in a log only the evaluations' bar reports
        steps_bar.set_postfix_str(text)
        candidates_bar.set_postfix_str(f"{text} of {steps_total}" if steps_total else text)

    steps = SimpleNamespace(set_postfix_str=postfix, update=steps_bar.update)
    try:
        return greedy.run_search(evaluator, state, target, len(batches), on_step=save, bar=steps,
                                 screen_batches=screen_batches, screen_top=screen_top)
    except KeyboardInterrupt:
        if state["steps"]:
            log.warning("interrupted: %d steps saved in %s; rerun with --resume", len(state["steps"]), side)
        raise
    finally:
        steps_bar.close()
        candidates_bar.close()


def plan_loss(backend, batches, moves, plan) -> float:
    """Loss of one plan (whole forwards), leaving the backend's pattern and strides as they were."""
    previous = backend.pattern, list(getattr(backend, "decode_stride", []))
    moves.apply(backend, plan)
    try:
        nll, tokens = 0.0, 0
        for ids in batches:
            part, count = backend.batch_nll(ids)
            nll, tokens = nll + part, tokens + count
    finally:
        backend.set_pattern(previous[0])
        if previous[1]:
            backend.set_decode_stride(previous[1])
    return nll / tokens


def evaluator_loss(backend, batches, pattern: str) -> float:
    """Loss of one pattern (whole forwards), leaving the backend's pattern as it was."""
    return plan_loss(backend, batches, SharedMoves(), pattern)
