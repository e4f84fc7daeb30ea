"""The decode stride's per-batch decision (``sglang_overlay/stride_state.py``; no SGLang, no torch).

Groups of F layers by stride, the step kinds and their labels, run-time switches that keep the
captured groups, and the row mirror: a request refreshes at its first decode step, then every
``stride`` steps; a slot whose generation changed, a row invalidated by a prefill, or an unknown
position forces a refresh; a refresh of a larger-stride group refreshes every smaller one too.
"""

from __future__ import annotations

import pytest

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import UsageError
from sglang_indexcache.sglang_overlay.stride_state import MAX_GROUPS, RowMirror, StridePlan, kind_label

E4 = pat.uniform(8, 4)  # FSSSFSSS


def test_uniform_stride_is_one_group_of_every_f_layer():
    plan = StridePlan.of(E4, [4] * 8)
    assert plan.groups == ((0, 4),) and plan.strides == (4,) and plan.active
    assert plan.labels() == ("reuse", "refresh") and plan.kind_of("reuse") == 0
    assert plan.refreshes(0, 1) and not plan.refreshes(0, 0)
    assert plan.refreshes(1, 0), "an S layer (no group) is never a reuse layer"
    assert plan.layer_strides() == [4, 1, 1, 1, 4, 1, 1, 1] and plan.describe() == "4"


def test_per_layer_strides_group_by_value_smallest_first():
    plan = StridePlan.of("FFFFFFFF", [8, 2, 1, 8, 4, 2, 8, 1])
    assert plan.groups == ((1, 5), (4,), (0, 3, 6)) and plan.strides == (2, 4, 8)
    assert plan.labels() == ("reuse", "refresh-1", "refresh-2", "refresh")
    assert [plan.refreshes(layer, 2) for layer in (1, 4, 0, 2)] == [True, True, False, True]
    assert plan.describe() == "8/2/1/8/4/2/8/1"


def test_stride_one_everywhere_or_only_on_s_layers_is_inactive():
    assert not StridePlan.of(E4, [1] * 8).active
    assert not StridePlan.of(E4, [1, 4, 4, 4, 1, 8, 8, 8]).active    # strides above 1 on S layers only
    assert kind_label(0, 0) == "refresh"


def test_too_many_groups_are_refused():
    strides = [2 ** (i + 1) for i in range(MAX_GROUPS + 1)] + [1] * 3
    with pytest.raises(UsageError, match=f"at most {MAX_GROUPS} distinct strides"):
        StridePlan.of("F" * 8, strides)


def test_switch_keeps_groups_and_changes_values():
    plan = StridePlan.of("FFFFFFFF", [4, 4, 1, 8, 8, 1, 4, 8])
    switched = plan.with_strides([2, 2, 1, 1, 1, 1, 2, 1])                # group of 8 goes to 1: refresh always
    assert switched.groups == plan.groups and switched.strides == (2, 1)
    with pytest.raises(UsageError, match="must keep one stride"):
        plan.with_strides([4, 2, 1, 8, 8, 1, 4, 8])
    with pytest.raises(UsageError, match="stay at 1 until a restart"):
        plan.with_strides([4, 4, 2, 8, 8, 1, 4, 8])


def _run(mirror, plan, steps, rows, gens, start):
    """Decode ``steps`` steps of ``rows`` from query position ``start`` (one for all, or one per row);
    the kinds taken."""
    starts = start if isinstance(start, list) else [start] * len(rows)
    return [mirror.decide(plan, rows, gens, [p + s for p in starts]) for s in range(steps)]


def test_refresh_every_stride_steps_and_at_the_first_step():
    plan = StridePlan.of(E4, [4] * 8)
    mirror = RowMirror(1, 10)
    assert _run(mirror, plan, 9, [3, 5], [1, 1], 100) == [1, 0, 0, 0, 1, 0, 0, 0, 1]


def test_a_joining_request_forces_a_refresh_of_the_batch():
    plan = StridePlan.of(E4, [4] * 8)
    mirror = RowMirror(1, 10)
    assert _run(mirror, plan, 2, [3], [1], 100) == [1, 0]
    assert mirror.decide(plan, [3, 7], [1, 1], [102, 50]) == 1        # row 7 has no entry
    assert _run(mirror, plan, 4, [3, 7], [1, 1], [103, 51]) == [0, 0, 0, 1]  # both refreshed; 3 reuse steps


def test_a_new_generation_or_an_invalidated_row_refreshes():
    plan = StridePlan.of(E4, [4] * 8)
    mirror = RowMirror(1, 10)
    _run(mirror, plan, 1, [3], [1], 100)
    assert mirror.decide(plan, [3], [2], [101]) == 1, "the slot was re-allocated: its entry belongs to another request"
    assert mirror.decide(plan, [3], [2], [102]) == 0
    mirror.invalidate([3])                                             # a prefill/extend of the row
    assert mirror.decide(plan, [3], [2], [103]) == 1
    mirror.invalidate()                                                # a switch: every row
    assert mirror.decide(plan, [3], [2], [104]) == 1


def test_positions_that_do_not_advance_refresh():
    plan = StridePlan.of(E4, [4] * 8)
    mirror = RowMirror(1, 10)
    _run(mirror, plan, 1, [3], [1], 100)
    assert mirror.decide(plan, [3], [1], [100]) == 1, "same position again (a recomputed step) is no reuse"
    assert mirror.decide(plan, [3], [1], [90]) == 1, "a position before the refresh is no reuse"


def test_unknown_positions_refresh_and_leave_no_entry():
    plan = StridePlan.of(E4, [4] * 8)
    mirror = RowMirror(1, 10)
    assert mirror.refresh_without_positions(plan, [3]) == 1
    assert mirror.decide(plan, [3], [1], [101]) == 1


def test_groups_refresh_on_their_own_stride_and_drag_the_smaller_ones():
    plan = StridePlan.of("FFFF", [2, 4, 2, 1])                          # groups: stride 2 (0, 2), stride 4 (1)
    mirror = RowMirror(2, 4)
    kinds = _run(mirror, plan, 9, [1], [1], 10)
    # step 0: nothing stored -> all; then group 0 every 2 steps, group 1 every 4 (dragging group 0)
    assert kinds == [2, 0, 1, 0, 2, 0, 1, 0, 2]
    labels = [kind_label(k, 2) for k in kinds[:3]]
    assert labels == ["refresh", "reuse", "refresh-1"]


def test_a_group_switched_to_stride_one_refreshes_every_step():
    plan = StridePlan.of(E4, [4] * 8).with_strides([1] * 8)
    mirror = RowMirror(1, 10)
    assert _run(mirror, plan, 5, [3], [1], 100) == [1] * 5
