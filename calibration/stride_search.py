"""``indexcache calibrate --stride-target T``: per-layer decode strides by the greedy search.

Over a fixed F/S pattern (a pattern file from a keep search, ``every-N``, ...), start with stride 1
on every layer and, step by step, raise the stride of the one F layer (to the next of ``1, 2, 4,
..., max_stride``) whose raise costs least LM loss on the calibration batches, until the effective
stride (harmonic mean over F layers: the F indexers then do ``1 / T`` of their decode work) reaches
``T``. It is :func:`.greedy.run_search` with :class:`.moves.StrideMoves`: the same exact prefix
reuse, screening, resume and accounting as the keep search. Losses are teacher-forced
(``models/decode_reuse.py``).

The pattern file written is the input's (its ``calibration`` block kept) with ``decode_stride`` and a
``decode_stride_calibration`` block added; OUT.state.json is the resumable state, as for ``--keep``.
"""

from __future__ import annotations

import datetime as _dt
import logging

from sglang_indexcache import __version__, pattern_file
from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import UsageError

from . import greedy
from .moves import StrideMoves, stride_levels
from .run import _identity, load_or_create_state, plan_loss, search, write_result

log = logging.getLogger(__name__)
STEP_KEYS = ("raised", "loss", "decode_stride", "layer_forwards", "naive_layer_forwards", "seconds")


def base_document(spec: str, info) -> dict:
    """The pattern file a stride search starts from: the file itself, or a new one for a spec."""
    kind, _ = pattern_file.parse_spec(spec)
    pattern, _ = pattern_file.resolve_with_strides(spec, info.num_dsa_layers, info)
    if kind == "file":
        return pattern_file.read(spec)
    return pattern_file.make_document(pattern, info, method="uniform" if kind in ("every", "all-F") else "manual")


def check_target(target: float, max_stride: int) -> None:
    if not 1.0 <= target <= max_stride:
        raise UsageError(f"--stride-target must be between 1 and --max-stride {max_stride}, got {target:g}")


def calibrate_stride(backend, blocks, info, spec: str, target: float, out, max_stride: int = 8, resume=False,
                     batch_size=4, screen_batches=None, screen_top=3, plot=True, on_step=None,
                     max_seconds=None) -> dict:
    """Run the stride search over the pattern of ``spec`` and write the pattern file ``out``.

    ``backend``: a TransformersBackend (the server does not reuse top-k across decode steps yet);
    ``blocks``: TokenBlocks; ``info``: ModelInfo. Returns the pattern-file document.
    """
    check_target(target, max_stride)
    document = base_document(spec, info)
    pattern = document["pattern"]
    moves = StrideMoves(pattern, stride_levels(max_stride))
    options = {"stride_target": target, "stride_levels": list(moves.levels), "screen_batches": screen_batches,
               "screen_top": screen_top if screen_batches else None}
    state = load_or_create_state(out, resume, None, options, _identity(info, blocks, batch_size, pattern))
    state.setdefault("decode_stride", [1] * backend.num_layers)
    batches = list(blocks.batches(batch_size))
    search(backend, batches, state, target, out, moves, None, None, f"greedy stride {target:g}",
           screen_batches, screen_top, on_step, max_seconds)
    uniform = None
    if float(target).is_integer():
        strides = pat.uniform_strides(backend.num_layers, int(target))
        uniform = {"decode_stride": strides, "loss": plan_loss(backend, batches, moves, tuple(strides))}
    final = state["decode_stride"]
    document["decode_stride"] = final
    document["decode_stride_calibration"] = {
        "method": "greedy", "stride_target": target, "effective_stride": pat.effective_stride(pattern, final),
        "levels": list(moves.levels), "data": blocks.describe(), "baseline_loss": state["baseline_loss"],
        "loss": greedy.final_loss(state), "uniform": uniform,
        "steps": [{k: s[k] for k in STEP_KEYS if k in s} for s in state["steps"]],
        "layer_forwards": state["layer_forwards"], "naive_layer_forwards": state["naive_layer_forwards"],
        "batch_size": batch_size, "seq_len": int(blocks.input_ids.shape[1]), "options": options,
        "seconds": round(state["seconds"], 2), "backend": type(backend).__name__,
    }
    document["created_by"] = f"sglang-indexcache {__version__}"
    document["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    plotter = None
    if plot:
        from .plots import plot_stride_calibration as plotter
    return write_result(out, document, plotter)
