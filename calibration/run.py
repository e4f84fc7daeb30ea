"""``indexcache calibrate`` as a library call: resumable greedy search -> pattern file + plot.

The search state is written atomically to ``OUT.state.json`` after every step, and every
``SAVE_EVERY_S`` seconds while a step's candidates are scored (with the candidates scored so far,
:mod:`.recorder`); ``resume=True`` continues from it (same model fingerprint, data hash, keep ratio
and options required) and reaches the same pattern, re-using those candidates. ``max_seconds``
stops the search at an evaluation boundary with the state saved. The pattern file and
its plot are renamed into place together, and the state file removed, in one step that Ctrl-C
cannot split.
"""

from __future__ import annotations

import json
import logging
import time

from sglang_indexcache import pattern as pat
from sglang_indexcache import pattern_file, progress
from sglang_indexcache.atomic import atomic_write_text, staged_files
from sglang_indexcache.errors import UsageError

from . import greedy
from .paths import plot_path, state_path
from .moves import SharedMoves
from .recorder import RecordingEvaluator, SearchStopped, consistent

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


SAVE_EVERY_S = 2.0  # the state is rewritten at most this often while a step's candidates are scored


def _partial_ticks(state, moves) -> int:
    """Candidate x batch evaluations already recorded for the current step (skipped on resume)."""
    partial = state.get("partial") or {}
    if partial.get("plan") != moves.record(moves.plan_of(state)):
        return 0
    return sum(len(key.split(":")[1].split(",")) for key in partial.get("results", {}))


def calibrate(backend, blocks, info, keep: float, out, resume=False, batch_size=4, screen_batches=None,
              screen_top=3, plot=True, on_step=None, max_seconds=None) -> dict:
    """Run the greedy search and write the pattern file ``out`` (+ :func:`plot_path` beside it).

    ``backend``: TransformersBackend (prefix reuse) or a server backend (whole forwards);
    ``blocks``: TokenBlocks; ``info``: ModelInfo. Returns the pattern-file document.
    ``max_seconds``: stop before starting an evaluation after that long, save the state (with the
    step's scored candidates) and raise :class:`SearchStopped`; ``resume=True`` continues.
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
    timings_before = dict(state.get("server_timings") or {})  # earlier runs of a resumed search
    search(backend, batches, state, target, out, SharedMoves(), ticks, steps_total, f"greedy keep {keep:g}",
           screen_batches, screen_top, on_step, max_seconds)
    uniform = uniform_at(backend.num_layers, keep)
    uniform = {"pattern": uniform, "loss": evaluator_loss(backend, batches, uniform)}
    _add_server_timings(state, backend, timings_before)
    document = _document(state, backend, blocks, info, keep, batch_size, options, uniform)
    plotter = None
    if plot:
        from .plots import plot_calibration as plotter
    return write_result(out, document, plotter)


def write_result(out, document: dict, plotter=None) -> dict:
    """Commit a finished search: the pattern file ``out`` and, with ``plotter(document, path)``, its
    plot at :func:`plot_path` appear together or not at all; the search state beside ``out`` goes."""
    outputs = [out, plot_path(out)] if plotter else [out]
    with staged_files(*outputs, remove=[state_path(out)]) as staged:
        pattern_file.write(staged[0], document)
        if plotter:
            plotter(document, staged[1])
    return document


def search(backend, batches, state, target, out, moves, ticks, steps_total, desc, screen_batches=None,
           screen_top=3, on_step=None, max_seconds=None) -> dict:
    """:func:`greedy.run_search` over ``moves`` with progress bars and the state kept in ``OUT.state.json``.

    The state is saved atomically after every step (``on_step(state)`` called after it) and every
    ``SAVE_EVERY_S`` seconds while a step's candidates are scored (:mod:`.recorder`); on Ctrl-C or
    at ``max_seconds`` (:class:`SearchStopped`) once more, then the exception goes on to the caller,
    which says how to resume. Per-stage server times (a server backend) are added to the state.
    ``ticks`` / ``steps_total``: the bars' totals (None when unknown).
    """
    side = state_path(out)
    saved = {"at": time.monotonic()}
    timings_before = dict(state.get("server_timings") or {})  # earlier runs of a resumed search

    def save(current=state, step_done=True):
        _add_server_timings(current, backend, timings_before)
        atomic_write_text(side, json.dumps(current, indent=1) + "\n")
        saved["at"] = time.monotonic()
        if step_done and on_step is not None:
            on_step(current)

    def recorded():
        if time.monotonic() - saved["at"] >= SAVE_EVERY_S:
            save(step_done=False)
        bars.refresh()

    bars = _Bars(ticks, steps_total, len(state["steps"]), desc, _partial_ticks(state, moves))
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    evaluator = RecordingEvaluator(greedy.make_evaluator(backend, batches, tick=bars.tick, moves=moves), state,
                                   len(batches), on_result=recorded, deadline=deadline)
    bars.recorder = evaluator
    try:
        result = greedy.run_search(evaluator, state, target, len(batches), on_step=save, bar=bars,
                                   screen_batches=screen_batches, screen_top=screen_top)
    except (KeyboardInterrupt, SearchStopped) as exc:
        why = "stopped (--max-seconds)" if isinstance(exc, SearchStopped) else "interrupted"
        if consistent(state, moves):
            save(step_done=False)
            log.info("%s: %d steps and %d candidates of the next saved in %s", why,
                     len(state["steps"]), len(state["partial"]["results"]), side)
        else:  # caught between a commit and its step record: the last saved state stands
            log.info("%s: %s holds the search up to its last save", why, side)
        raise
    finally:
        bars.close()
    return result


def _add_server_timings(state, backend, base: dict) -> None:
    """Per-stage server times (``ServerTimings``) of this run added to the earlier runs' ``base``."""
    timings = getattr(backend, "timings", None)
    if timings is None:
        return
    total = {k: base.get(k, 0) + v for k, v in timings.as_dict().items()}
    state["server_timings"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in total.items()}


class _Bars:
    """The two progress bars (steps; candidate x batch evaluations) and their shared postfix."""

    def __init__(self, ticks, steps_total, steps_done, desc, recorded_ticks=0):
        self.recorder, self.text, self.steps_total = None, "", steps_total
        total = None if ticks is None else max(0, ticks - recorded_ticks)
        self.candidates = progress.bar(total=total, desc="candidates x batches", unit="fwd", position=1)
        self.steps = progress.bar(total=steps_total, initial=steps_done, desc=desc, unit="step", position=0,
                                  log_lines=False)

    def tick(self):
        self.candidates.update(1)

    def set_postfix_str(self, text):  # in a log only the evaluations' bar reports: it carries everything
        self.text = text
        self.refresh()

    def refresh(self):
        self.steps.set_postfix_str(self.text)
        extra = f"; {self.recorder.postfix()}" if self.recorder is not None else ""
        of = f" of {self.steps_total}" if self.steps_total else ""
        self.candidates.set_postfix_str(f"{self.text}{of}{extra}")

    def update(self, n=1):
        self.steps.update(n)

    def close(self):
        self.steps.close()
        self.candidates.close()


def _document(state, backend, blocks, info, keep, batch_size, options, uniform) -> dict:
    extra = {"server_timings": state["server_timings"]} if "server_timings" in state else {}
    return pattern_file.make_document(
        state["pattern"], info, method="greedy", keep_ratio=keep, data=blocks.describe(),
        baseline_loss=state["baseline_loss"], loss=greedy.final_loss(state),
        steps=[{k: s[k] for k in ("removed", "loss", "pattern", "candidates", "layer_forwards",
                                  "naive_layer_forwards", "seconds") if k in s} for s in state["steps"]],
        layer_forwards=state["layer_forwards"], naive_layer_forwards=state["naive_layer_forwards"],
        uniform=uniform, batch_size=batch_size,
        seq_len=int(blocks.input_ids.shape[1]), options=options, seconds=round(state["seconds"], 2),
        evaluations=state.get("evaluations", 0), backend=type(backend).__name__, **extra,
    )


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
