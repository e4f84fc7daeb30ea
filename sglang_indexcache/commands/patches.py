"""Apply, revert or check the SGLang patch series (``make apply-patches`` and its siblings call these).

``indexcache apply-patches DIR``, ``indexcache revert-patches DIR``, ``indexcache check-patches [DIR]``.
DIR is a git checkout of SGLang (it has ``python/sglang/``) or the folder holding an installed
``sglang/`` package (e.g. ``site-packages``). The SGLang version in DIR picks the series (one per
supported release); every patch is checked with ``git apply --check`` before anything changes (all
or nothing); applying twice says "already applied"; reverting restores the files byte for byte.
``check-patches`` alone checks every release's series (no missing, unused or duplicate patch);
with DIR it also says whether DIR's release is patched or applies cleanly. Details: docs/sglang.md.
"""

from __future__ import annotations

from ..sglang_overlay import patchset

ACTIONS = {"apply-patches": patchset.apply, "revert-patches": patchset.revert, "check-patches": patchset.check}


def add_arguments(parser) -> None:
    parser.add_argument("directory", metavar="DIR", nargs="?",
                        help="SGLang checkout (python/sglang/) or the folder holding an installed sglang/"
                             " (check-patches without DIR checks only the series)")


def run(args) -> int:
    print(ACTIONS[args.verb](args.directory or None))
    return 0
