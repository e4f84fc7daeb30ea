"""Train the F layers' indexers with the multi-layer distillation loss (training-aware IndexCache).

The main model is frozen; each F layer's indexer learns the average attention distribution of the
layers it serves (itself and the S layers after it). Writes a new HF checkpoint to --out in which
only the F layers' indexer tensors differ, plus out/pattern.json and a report in out/distill/
(report.json, loss.png). After Ctrl-C the same command with --resume continues from the last saved
step (--force does not start over a folder that holds a saved run). --out must be new or empty
unless --force, and never the model, the data or the pattern file. About 3 minutes with the
defaults on the embedded model on 2 idle CPU cores (docs/cli.md).
"""

from __future__ import annotations

from .. import pattern as pat
from .options import add_force, add_model, check_output, positive_float, positive_int

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_EVAL_TOKENS = 60, 4, 32768
DISTILL_STATE = ("distill", "state.pt")  # under --out (training/distill_run.py)


def add_arguments(parser):
    add_model(parser, what="HF-format GlmMoeDsa checkpoint directory")
    parser.add_argument("--pattern", required=True, metavar="P",
                        help="pattern string, every-N, all-F or a pattern file")
    parser.add_argument("--data", required=True, metavar="SRC", help="training text (.txt/.jsonl/.parquet, folder, hub name)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="new checkpoint directory (must be new or empty unless --resume or --force)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH,
                        help=f"blocks per step (default {DEFAULT_BATCH})")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per block (default 512)")
    parser.add_argument("--form", choices=("warmup", "sparse"), default="warmup",
                        help="warmup: KL over all causal keys, targets from a dense forward (default);"
                             " sparse: KL over the F layer's selected top-k, targets from the forward under the pattern")
    parser.add_argument("--single-layer", action="store_true",
                        help="ablation: each F indexer learns only its own layer's attention")
    parser.add_argument("--resume", action="store_true", help="continue from out/distill/state.pt")
    parser.add_argument("--eval-data", metavar="SRC", default=None,
                        help="held-out text for LM loss before/after (default: last 10%% of --data's blocks)")
    parser.add_argument("--eval-tokens", type=positive_int, default=DEFAULT_EVAL_TOKENS,
                        help=f"at most this many held-out tokens (default {DEFAULT_EVAL_TOKENS})")
    parser.add_argument("--train-tokens", type=positive_int, default=None, help="at most this many training tokens")
    parser.add_argument("--text-field", default="text", help="column of jsonl/parquet data (default text)")
    parser.add_argument("--save-every", type=positive_int, default=20, help="checkpoint the state every N steps")
    parser.add_argument("--seed", type=int, default=0, help="batch order seed")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: 1 when the machine is busy, i.e. load average"
                             " >= cores - 1, else torch's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_force(parser)


def check_arguments(args) -> str:
    """Checks that need no torch: the model's headers, the pattern, --resume, --out. Returns the pattern."""
    from pathlib import Path

    from .. import pattern_file
    from ..errors import UsageError
    from ..model_info import load_model_info

    info = load_model_info(args.model)
    pattern = pattern_file.resolve(args.pattern, info.num_dsa_layers, info)
    if pat.is_all_full(pattern):
        raise UsageError(f"--pattern {args.pattern} is all F: no indexer serves another layer, so there is"
                         " nothing to distill (give a pattern with S layers, e.g. every-4)")
    state = Path(args.out).joinpath(*DISTILL_STATE)
    if args.resume and not state.is_file():
        raise UsageError(f"--resume: there is no interrupted run to continue ({state} does not exist);"
                         " run without --resume to start one")
    from ..calibration.data import check_source

    pattern_input = args.pattern if pattern_file.parse_spec(args.pattern)[0] == "file" else None
    check_output("--out", args.out, "dir", force=args.force, resume=args.resume, saved_state=state,
                 inputs=(args.model, args.data, args.eval_data, pattern_input))
    check_source(args.data)
    check_source(args.eval_data)
    return pattern


def run(args) -> int:
    import json

    check_arguments(args)
    from ..calibration.session import set_threads
    from ..training.distill_run import DistillConfig
    from ..training.distill_run import run as run_distill

    set_threads(args.threads)
    config = DistillConfig(
        model=args.model, pattern=args.pattern, data=args.data, out=args.out, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, form=args.form, single_layer=args.single_layer,
        resume=args.resume, eval_data=args.eval_data, eval_tokens=args.eval_tokens,
        train_tokens=args.train_tokens, text_field=args.text_field, seed=args.seed, save_every=args.save_every,
        force=args.force,
    )
    try:
        report = run_distill(config)
    except KeyboardInterrupt:
        from pathlib import Path

        from ..errors import Interrupted

        state = Path(args.out).joinpath(*DISTILL_STATE)
        raise Interrupted(f"the steps so far are saved in {state}: the same command with --resume continues"
                          " from the last saved step" if state.is_file() else "") from None
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
        return 0
    loss = report["lm_loss"]
    gap = report["gap_closed"]
    print(f"distilled {report['describe']} ({report['steps']} steps, {report['train_seconds']:.0f} s training)")
    print(f"LM loss (nats/token) on {report['eval_data']['source']}: all-F {loss['all_f_before']:.4f};"
          f" pattern before {loss['pattern_before']:.4f}, after {loss['pattern_after']:.4f}"
          + (f" (gap closed {100 * gap:.0f}%)" if gap is not None else ""))
    print(f"checkpoint: {report['out']}  report: {report['out']}/distill/report.json")
    return 0
