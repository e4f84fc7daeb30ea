"""Cross-layer top-k overlap of a DSA model: overlap.json + overlap.png heatmap.

Runs every layer's own indexer (as if all F) on the data and reports, for every pair of layers,
the mean share of layer i's top-k that layer j also selects, over query tokens that have more
candidate keys than k. --out must be a new or empty folder unless --force.
"""

from __future__ import annotations

from .options import add_data_arguments, add_force, add_model, check_output

DEFAULT_OVERLAP_TOKENS = 8192


def add_arguments(parser):
    add_model(parser)
    add_data_arguments(parser, DEFAULT_OVERLAP_TOKENS)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for overlap.json and overlap.png (new or empty unless --force)")
    add_force(parser)


def run(args) -> int:
    import json

    from types import SimpleNamespace

    from ..calibration.data import check_source
    from ..calibration.session import seq_len_for
    from ..errors import UsageError
    from ..model_info import load_model_info
    from ..validation import require_every_indexer

    out = check_output("--out", args.out, "dir", force=args.force, inputs=(args.model, args.data))
    info = load_model_info(args.model)
    require_every_indexer(info.num_dsa_layers, info.layers_with_indexer, args.model,
                          "overlap needs every layer's indexer", UsageError)
    topk, seq_len = int(info.config["index_topk"]), seq_len_for(SimpleNamespace(**info.config), args.seq_len)
    if seq_len <= topk:
        raise UsageError(f"--seq-len {seq_len} must exceed the model's index_topk {topk}")
    check_source(args.data)
    from .. import progress
    from ..analysis.overlap import adjacent_mean, overlap_matrix
    from ..atomic import atomic_write_text, staged_dir
    from ..calibration.plots import plot_overlap
    from ..calibration.session import load_backend, load_data

    backend = load_backend(args.model, threads=args.threads)
    blocks = load_data(args, backend.tokenizer, backend.config)
    batches = list(blocks.batches(args.batch_size))
    result = overlap_matrix(backend, batches, lambda it: progress.bar(it, total=len(it), desc="overlap", unit="batch"))
    result["adjacent_mean"] = adjacent_mean(result["matrix"])
    result["data"] = blocks.describe()
    title = f"{info.path.name}: top-k overlap (k={result['topk']}, {result['tokens']} queries)"
    with staged_dir(out) as staged:  # overlap.json and overlap.png appear together, or neither does
        atomic_write_text(staged / "overlap.json", json.dumps(result, indent=1) + "\n")
        plot_overlap(result["matrix"], staged / "overlap.png", title)
    print(f"wrote {out / 'overlap.json'} and {out / 'overlap.png'}: {result['layers']} layers,"
          f" {result['tokens']} queries; mean adjacent-layer overlap {result['adjacent_mean']:.3f}"
          " (paper, 30B model: 0.7-1.0)")
    return 0
