"""``indexcache bench kernels``: the DSA kernels alone, against the device's measured ceilings.

Registered as a mode of ``indexcache bench`` (commands/bench.py); the logic is in
``sglang_indexcache.bench.kernels`` (``KernelBenchSpec``, ``run``, ``table``).
"""

from __future__ import annotations

import json
import os

from .. import checks
from ..errors import UsageError
from .options import add_force, int_list

MODE = "kernels"
SHORT = "the DSA kernels alone (sglang_indexcache.bench.kernels)"
DESCRIPTION = ("Times the sparse MLA decode and indexer kernels against the device's measured ceilings"
               " (a CUDA GPU; --device cpu smoke-tests it under TRITON_INTERPRET=1 at tiny sizes).")


def add_arguments(modes) -> None:
    from ..bench.kernels import SHAPES

    parser = modes.add_parser(MODE, help=SHORT, description=DESCRIPTION)
    parser.add_argument("--shapes", default="deepseek-v3.2,glm-5", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--ops", default="mla,indexer-decode,indexer-prefill",
                        help="which kernels: mla, indexer-decode, indexer-prefill (comma-separated)")
    parser.add_argument("--batch", default="1,16,64", help="decode batch sizes (default 1,16,64)")
    parser.add_argument("--contexts", default="8k,32k,128k,200k",
                        help="indexer decode contexts (default 8k,32k,128k,200k)")
    parser.add_argument("--mla-contexts", default="8k,128k", help="sparse MLA decode contexts (default 8k,128k)")
    parser.add_argument("--prefill-contexts", default="8k,32k,64k,128k", help="prefill lengths (default up to 128k)")
    parser.add_argument("--budget", type=float, default=0.4, help="seconds of timed calls per row (default 0.4)")
    parser.add_argument("--sglang-triton-dir", default=".cache/kernel-anchors",
                        help="folder with SGLang's triton_sparse_mla{,_decode}.py (scripts/fetch_kernel_anchors.sh)")
    parser.add_argument("--mla-config", default=None,
                        help='JSON launch config for our MLA kernel, e.g. \'{"block_h": 32}\'')
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only smoke-tests this benchmark (with TRITON_INTERPRET=1, tiny sizes)")
    parser.add_argument("--mla-sweep", action="store_true",
                        help="first time our MLA kernel under several launch configs (128 and 64 heads)")
    parser.add_argument("--json", action="store_true", help="print the result document as JSON")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON document here")
    add_force(parser)


def check(args) -> None:
    """Checks before torch is imported (the outputs are checked by commands/bench.py)."""
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("bench kernels --device cpu runs the Triton kernels in Triton's interpreter:"
                         " set TRITON_INTERPRET=1 (TRITON_INTERPRET=1 indexcache bench kernels --device cpu)")


def spec(args):
    """The ``KernelBenchSpec`` of the parsed command line; bad values raise UsageError (exit 2)."""
    from ..bench.kernels import KernelBenchSpec

    try:
        sizes = {"batches": int_list(args.batch, "--batch"), "contexts": int_list(args.contexts, "--contexts"),
                 "prefill": int_list(args.prefill_contexts, "--prefill-contexts"),
                 "mla_contexts": int_list(args.mla_contexts, "--mla-contexts"),
                 "mla_config": json.loads(args.mla_config) if args.mla_config else None}
    except (UsageError, ValueError) as exc:
        raise UsageError(f"bad number list or JSON: {exc}") from exc
    result = KernelBenchSpec(shapes=[s.strip() for s in args.shapes.split(",")],
                             ops={o.strip() for o in args.ops.split(",")}, budget=args.budget,
                             anchors_dir=args.sglang_triton_dir, mla_sweep=args.mla_sweep, device=args.device,
                             **sizes)
    checks.torch_device(args.device, need=" (bench kernels needs a CUDA GPU; the Triton kernels are tested on"
                        " the CPU by pytest)")
    return result


def run(args) -> int:
    from ..atomic import atomic_write_json
    from ..bench import kernels as kernel_bench

    save = (lambda doc: atomic_write_json(args.save, doc)) if args.save else None
    doc = kernel_bench.run(spec(args), on_rows=save)
    print(json.dumps(doc, indent=1) if args.json else kernel_bench.table(doc))
    return 0
