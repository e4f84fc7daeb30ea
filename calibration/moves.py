"""What one greedy step may change: the keep search's F -> S flips, or a decode-stride raise.

A *plan* is what the search walks: the F/S pattern for :class:`SharedMoves`, a tuple of per-layer
decode strides over a fixed pattern for :class:`StrideMoves`. Both keep the one property the exact
prefix reuse of :mod:`.evaluators` needs: move ``j`` changes nothing before layer ``j``. The search
(:mod:`.greedy`) and the evaluators only call the methods below, so both searches share every line
of search, caching, resume and accounting.
"""

from __future__ import annotations

from sglang_indexcache import pattern as pat


def flip(pattern: str, j: int) -> str:
    return pattern[:j] + pat.SHARED + pattern[j + 1:]


class SharedMoves:
    """The keep search: plan = pattern; a move makes one F layer (never layer 0) S; stops at
    ``target`` F layers."""

    step_key = "removed"

    def plan_of(self, state: dict) -> str:
        return state["pattern"]

    def store(self, state: dict, plan: str) -> None:
        state["pattern"] = pat.validate(plan, len(plan))

    def record(self, plan: str) -> dict:
        return {"pattern": plan}

    def candidates(self, plan: str) -> list[int]:
        return [j for j in pat.full_layers(plan) if j != 0]

    def move(self, plan: str, j: int) -> str:
        return flip(plan, j)

    def done(self, plan: str, target: int) -> bool:
        return plan.count(pat.FULL) <= target

    def layer_args(self, plan: str, i: int) -> dict:
        return {"full": plan[i] == pat.FULL}

    def apply(self, backend, plan: str) -> None:
        backend.set_pattern(plan)

    def describe(self, j: int) -> str:
        return f"layer {j} made S"

    def label(self, j: int) -> str:  # the progress line's short form
        return f"layer {j} {pat.SHARED}"


def stride_levels(max_stride: int) -> tuple[int, ...]:
    """``1, 2, 4, ...`` up to ``max_stride`` (included even when not a power of two)."""
    levels = [1]
    while levels[-1] * 2 <= max_stride:
        levels.append(levels[-1] * 2)
    return tuple(levels) if levels[-1] == max_stride else (*levels, max_stride)


class StrideMoves:
    """The decode-stride search over a fixed ``pattern``: plan = per-layer strides (tuple); a move
    raises one F layer's stride to the next of ``levels``; stops once the effective stride (harmonic
    mean over F layers, :func:`pattern.effective_stride`) reaches ``target`` or nothing can rise."""

    step_key = "raised"

    def __init__(self, pattern: str, levels=(1, 2, 4, 8)):
        self.pattern = pattern
        self.levels = tuple(sorted(set(levels)))

    def plan_of(self, state: dict) -> tuple:
        return tuple(state["decode_stride"])

    def store(self, state: dict, plan: tuple) -> None:
        state["decode_stride"] = pat.validate_strides(list(plan), len(self.pattern))

    def record(self, plan: tuple) -> dict:
        return {"decode_stride": list(plan)}

    def candidates(self, plan: tuple) -> list[int]:
        return [j for j in pat.full_layers(self.pattern) if plan[j] < self.levels[-1]]

    def move(self, plan: tuple, j: int) -> tuple:
        raised = min(level for level in self.levels if level > plan[j])
        return plan[:j] + (raised,) + plan[j + 1:]

    def done(self, plan: tuple, target: float) -> bool:
        return pat.effective_stride(self.pattern, plan) >= target - 1e-9 or not self.candidates(plan)

    def layer_args(self, plan: tuple, i: int) -> dict:
        return {"full": self.pattern[i] == pat.FULL, "stride": plan[i]}

    def apply(self, backend, plan: tuple) -> None:
        backend.set_pattern(self.pattern)
        backend.set_decode_stride(list(plan))

    def describe(self, j: int) -> str:
        return f"layer {j} stride raised"

    def label(self, j: int) -> str:  # the progress line's short form
        return f"layer {j} stride up"
