"""Decode stride in the server: which F layers refresh their top-k this step, decided per batch (no torch).

An F layer with decode stride ``N > 1`` runs its indexer only every ``N`` decode steps of a request
and in between reuses the top-k it stored (``decode_stride`` holds the SGLang side, the store and
the hooks; ``kernels/topk_reuse.py`` the merge). Everything here is plain Python/numpy on the
scheduler's CPU, so that it can be decided before the forward and captured as CUDA-graph variants:

- **Groups.** The F layers with a stride above 1, grouped by stride, smallest stride first
  (:class:`StridePlan`). With uniform ``--index-cache-decode-stride 4``: one group of every F
  layer. F layers at stride 1 run their indexer at every step, exactly as without a stride.
- **Step kind** ``m`` in ``0 .. G`` (``G`` groups): the groups ``0 .. m-1`` refresh (run their
  indexer and store its top-k), the others reuse. A group needs a refresh when any request of the
  batch has no valid entry for it or its entry is ``stride`` positions old; the batch then also
  refreshes every group of a smaller stride (a refresh is never worse than a reuse, and the kinds
  stay ``G + 1``: one CUDA graph each). Labels: :func:`kind_label`.
- **Rows.** State is kept per request slot (row of SGLang's ``ReqToTokenPool``): the slot's
  *generation* when its entry was written and the query position of that refresh
  (:class:`RowMirror`). SGLang bumps a slot's generation on every allocation, so a finished,
  aborted or retracted request's entry is never read by the next owner of the slot; and every
  forward that is not a plain decode (prefill, chunked prefill, a mixed batch, a PD-transferred
  request) invalidates its rows, so a request always refreshes at its first decode step after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import pattern as pat
from ..errors import UsageError

MAX_GROUPS = 4  # distinct strides > 1 among the F layers: G + 1 CUDA graphs per batch size
REFRESH, REUSE = "refresh", "reuse"


def kind_label(kind: int, groups: int) -> str:
    """The label of step kind ``kind`` (groups ``0 .. kind-1`` refresh): ``refresh`` (all),
    ``reuse`` (none), ``refresh-<kind>`` between."""
    if kind >= groups:
        return REFRESH
    return REUSE if kind == 0 else f"{REFRESH}-{kind}"


@dataclass(frozen=True)
class StridePlan:
    """The F layers grouped by decode stride, and each group's stride.

    ``groups``: per group (ascending stride at creation) the layers it holds; ``strides``: per group
    the stride it runs now (a run-time switch may change the values, not the membership, while
    CUDA graphs are captured); ``pattern``: the F/S pattern it was built for.
    """

    pattern: str
    groups: tuple[tuple[int, ...], ...]
    strides: tuple[int, ...]

    @classmethod
    def of(cls, pattern: str, layer_strides) -> "StridePlan":
        """Group ``pattern``'s F layers by ``layer_strides`` (one per layer; S entries ignored)."""
        layer_strides = pat.validate_strides(list(layer_strides), len(pattern))
        by_stride: dict[int, list[int]] = {}
        for layer in pat.full_layers(pattern):
            if layer_strides[layer] > 1:
                by_stride.setdefault(layer_strides[layer], []).append(layer)
        if len(by_stride) > MAX_GROUPS:
            raise UsageError(f"decode strides {pat.describe_strides(pattern, layer_strides)}: at most {MAX_GROUPS}"
                             f" distinct strides above 1 among the F layers (each adds one CUDA graph per batch"
                             f" size), got {len(by_stride)}")
        ordered = sorted(by_stride)
        return cls(pattern, tuple(tuple(by_stride[s]) for s in ordered), tuple(ordered))

    @property
    def active(self) -> bool:
        return bool(self.groups)

    @property
    def kinds(self) -> int:
        return len(self.groups) + 1

    def labels(self) -> tuple[str, ...]:
        """Capture order: reuse first (the smallest graphs), refresh last."""
        return tuple(kind_label(m, len(self.groups)) for m in range(self.kinds))

    def kind_of(self, label: str) -> int:
        labels = self.labels()
        if label not in labels:
            raise ValueError(f"unknown decode-stride step kind {label!r}; one of {', '.join(labels)}")
        return labels.index(label)

    def group_of(self, layer: int) -> int | None:
        for g, layers in enumerate(self.groups):
            if layer in layers:
                return g
        return None

    def layer_strides(self) -> list[int]:
        """One stride per layer (1 on S layers and on F layers outside the groups)."""
        out = [1] * len(self.pattern)
        for layers, stride in zip(self.groups, self.strides):
            for layer in layers:
                out[layer] = stride
        return out

    def refreshes(self, layer: int, kind: int) -> bool:
        """Whether ``layer`` runs its indexer at a step of kind ``kind`` (layers outside a group always)."""
        g = self.group_of(layer)
        return g is None or g < kind

    def with_strides(self, layer_strides) -> "StridePlan":
        """The same groups at new strides (``layer_strides`` one per layer); a UsageError when they
        would need other groups (a layer leaving or joining one, two groups' layers split)."""
        layer_strides = pat.validate_strides(list(layer_strides), len(self.pattern))
        values = []
        for layers in self.groups:
            found = sorted({layer_strides[i] for i in layers})
            if len(found) != 1:
                raise UsageError(f"layers {pat.layer_ranges(layers)} were captured as one stride group and must keep"
                                 f" one stride, got {'/'.join(map(str, found))}")
            values.append(found[0])
        grouped = {i for layers in self.groups for i in layers}
        loose = [i for i in pat.full_layers(self.pattern) if i not in grouped and layer_strides[i] != 1]
        if loose:
            raise UsageError(f"F layers {pat.layer_ranges(loose)} started at stride 1 (no stored top-k, no CUDA graph"
                             " for them): they stay at 1 until a restart")
        return StridePlan(self.pattern, self.groups, tuple(values))

    def describe(self) -> str:
        return pat.describe_strides(self.pattern, self.layer_strides()) if pat.full_layers(self.pattern) else "1"


class RowMirror:
    """Per request slot and group: the slot's generation when its entry was stored, and the query
    position of that refresh (``-1``: no entry). ``rows``: SGLang's ``ReqToTokenPool`` rows."""

    def __init__(self, groups: int, rows: int):
        self.gen = np.full((groups, rows), -1, dtype=np.int64)            # [G, R]
        self.pos = np.full((groups, rows), -1, dtype=np.int64)            # [G, R]

    def invalidate(self, rows=None) -> None:
        """Drop the entries of ``rows`` (all rows when None)."""
        if rows is None:
            self.gen.fill(-1)
        elif len(rows):
            self.gen[:, np.asarray(rows, dtype=np.int64)] = -1

    def decide(self, plan: StridePlan, rows, gens, positions) -> int:
        """The step kind of a decode batch: rows, their slot generations now and their query
        positions (``seq_len - 1``). Commits it: the refreshed groups' entries are now this step's."""
        rows = np.asarray(rows, dtype=np.int64)
        gens = np.asarray(gens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        kind = 0
        for g, stride in enumerate(plan.strides):
            age = positions - self.pos[g, rows]
            if not (np.all(self.gen[g, rows] == gens) and np.all(age >= 1) and np.all(age < stride)):
                kind = g + 1
        if kind:
            self.gen[:kind, rows] = gens
            self.pos[:kind, rows] = positions
        return kind

    def refresh_without_positions(self, plan: StridePlan, rows) -> int:
        """A decode batch whose positions are unknown on the CPU: every group refreshes and the rows
        are left without an entry (the next step refreshes again)."""
        self.invalidate(rows)
        return len(plan.groups)
