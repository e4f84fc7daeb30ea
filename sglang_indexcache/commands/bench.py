"""Speed of a DSA layer stack under IndexCache patterns (prefill, decode) and of the DSA kernels.

``indexcache bench prefill --config tiny`` builds a stack of DSA layers with random weights from a
named config and times prefill at several contexts under all-F, every-2, every-4 and every-8;
``bench decode`` times decode steps at cached lengths with batch 1 and a larger batch;
``bench kernels`` times the kernels alone. Each row gives the median seconds, the speedup over
all-F, the indexer share of all-F, the Amdahl ``limit`` of all-F's measured profile and the
FLOP/byte model's ``floor_limit``. ``make bench`` (= ``bench prefill --config tiny``) takes about a
minute on 2 idle CPU cores; wide configs at long contexts take minutes per row on a CPU (use
``--topk``, ``--layers``, ``--contexts`` to size them). ``--save``/``--plot`` refuse an existing
file unless ``--force``.
"""

from __future__ import annotations

import json
import os

from .. import checks
from .. import pattern as pat
from ..errors import PatternError
from . import bench_kernels, bench_serve
from .options import add_force, check_output, int_list, non_negative_int, positive_int

CONFIG_NAMES = ("tiny", "glm-5", "deepseek-v3.2", "glm-30b-a3b")
DEFAULT_PATTERNS = "all-F,every-2,every-4,every-8"
LAYER_CAP = 8  # default stack depth at most this (a deeper model is cut to its first LAYER_CAP layers)
MODES = {
    "prefill": ("prefill of one request at each context",
                "Times the prefill of one request per context through a stack of DSA layers with random"
                " weights, under all-F and each pattern (docs/cli.md, 'bench')."),
    "decode": ("decode steps at each cached length",
               "Times single decode steps of the whole stack for --batch requests that each hold the"
               " context in paged caches, under all-F and each pattern (docs/cli.md, 'bench')."),
}


def _common(p, mode: str):
    p.add_argument("--config", default="tiny", metavar="NAME|FILE",
                   help=f"named config ({', '.join(CONFIG_NAMES)}) or a config.json path (default tiny)")
    p.add_argument("--layers", type=positive_int,
                   help=f"DSA layers in the stack (default: the model's, capped at {LAYER_CAP} by this bench)")
    p.add_argument("--contexts", help="comma-separated token counts, '4k' = 4096 (default: 4k,8k,16k on"
                   " the CPU, 8k,32k,64k,128k on a GPU)" + ("; cached tokens per request" if mode == "decode" else ""))
    p.add_argument("--patterns", default=DEFAULT_PATTERNS,
                   help=f"comma-separated pattern specs; all-F is always measured first (default {DEFAULT_PATTERNS})")
    p.add_argument("--pattern-file", action="append", default=[], metavar="FILE",
                   help="also measure the pattern of this indexcache-pattern/v1 file (repeatable)")
    p.add_argument("--repeats", type=positive_int, default=3 if mode == "prefill" else 10, help="timed runs per row (median)")
    p.add_argument("--warmup", type=non_negative_int, default=1 if mode == "prefill" else 3, help="untimed runs (of the pattern with the fewest F layers) before timing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--kernels", choices=("auto", "triton", "torch", "ref"), default="auto",
                   help="indexer/attention implementation (auto: Triton on a GPU, the references' math on the CPU)")
    p.add_argument("--topk", type=positive_int, help="override the config's index_topk")
    p.add_argument("--chunk", type=positive_int, default=None, help="prefill token chunk (default 1024 CPU, 16384 GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's own; 1 is steadier"
                   " on a busy machine)")
    p.add_argument("--json", action="store_true", help="print the result document as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="write the JSON document here after every context (atomic)")
    p.add_argument("--plot", metavar="FILE", help="write a speedup-versus-context plot (PNG)")
    add_force(p)


def add_arguments(parser):
    modes = parser.add_subparsers(dest="mode", metavar="MODE", parser_class=type(parser))
    modes.required = True
    parsers = {mode: modes.add_parser(mode, help=short, description=long) for mode, (short, long) in MODES.items()}
    _common(parsers["prefill"], "prefill")
    _common(parsers["decode"], "decode")
    parsers["decode"].add_argument("--batch", default="1,8", help="comma-separated decode batch sizes (default 1,8)")
    bench_kernels.add_arguments(modes)
    bench_serve.add_arguments(modes)


def _patterns(args, layers: int, model_layers: int) -> list[tuple[str, str]]:
    from .. import pattern_file

    specs = [s for s in args.patterns.split(",") if s.strip()] + list(args.pattern_file)
    out, seen = [("all-F", pat.all_full(layers))], {pat.all_full(layers)}
    for spec in specs:
        try:
            pattern = pattern_file.resolve(spec, layers)
        except PatternError as exc:
            if args.layers is not None:
                whose = f"set by --layers {layers}"
            elif model_layers > layers:
                whose = (f"this bench's default cap of {LAYER_CAP}; the config has {model_layers}:"
                         f" give --layers {model_layers} to bench them all")
            else:
                whose = f"the config's {model_layers}"
            raise PatternError(f"pattern {spec}: {exc} (here the model is the bench stack of {layers}"
                               f" layers, {whose})") from None
        if pattern not in seen:
            seen.add(pattern)
            out.append((pattern_file.spec_label(spec), pattern))
    return out


def _check(args) -> None:
    """Checks before torch is imported: outputs, contexts, batches, config, patterns."""
    inputs = list(getattr(args, "pattern_file", None) or [])
    config = getattr(args, "config", None)
    if config and (config.endswith(".json") or os.path.exists(config)):
        inputs.append(config)
    for flag in ("save", "plot"):
        if getattr(args, flag, None):
            check_output(f"--{flag}", getattr(args, flag), "file", force=args.force, inputs=inputs)
    if args.mode == bench_kernels.MODE:
        bench_kernels.check(args)
        return
    int_list(args.contexts or "1", "--contexts")
    if args.mode == "decode":
        int_list(args.batch, "--batch")


def _spec(args):
    from ..configs import load_config

    config = load_config(args.config)
    model_layers = int(config.get("num_hidden_layers", LAYER_CAP))
    layers = args.layers if args.layers is not None else min(model_layers, LAYER_CAP)
    patterns = _patterns(args, layers, model_layers)  # refused before torch loads
    import torch

    from ..bench.runner import BenchSpec
    from ..bench.stack import DTYPES

    device = checks.torch_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_contexts = "4k,8k,16k" if device.type == "cpu" else "8k,32k,64k,128k"
    return BenchSpec(
        mode=args.mode, config_name=args.config, config=config, layers=layers,
        contexts=int_list(args.contexts or default_contexts, "--contexts"),
        patterns=patterns, device=device, dtype=DTYPES[args.dtype], kernels=args.kernels,
        batches=int_list(args.batch, "--batch") if args.mode == "decode" else [1],
        repeats=args.repeats, warmup=args.warmup,
        chunk=args.chunk or (1024 if device.type == "cpu" else 16384), topk=args.topk, seed=args.seed,
    )


def run(args) -> int:
    if args.mode in bench_serve.MODES:
        return bench_serve.run(args)
    _check(args)
    if args.mode == bench_kernels.MODE:
        return bench_kernels.run(args)
    spec = _spec(args)
    from ..bench import report, runner
    from ..atomic import atomic_write_text

    save = (lambda doc: atomic_write_text(args.save, json.dumps(doc, indent=1) + "\n")) if args.save else None
    doc = (runner.run_prefill if spec.mode == "prefill" else runner.run_decode)(spec, on_rows=save)
    if args.plot:
        report.plot(doc, args.plot)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(report.header(doc))
        print(report.table(doc))
    return 0
