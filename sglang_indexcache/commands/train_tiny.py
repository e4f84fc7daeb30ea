"""Train the embedded tiny GlmMoeDsa model from scratch (dense LM, indexer warm-up, sparse stage).

Builds the corpus (CPython standard-library sources + pydoc topics; held-out split), trains a
byte-level BPE tokenizer, trains the model with the DSA recipe, saves it in bf16 to --out (default
runs/tiny-glm-dsa; the shipped models/tiny-glm-dsa is written only with --out models/tiny-glm-dsa
--force), then reports held-out losses on --out/data/evaluation.txt under all-F / every-2 / every-4
and the unigram baseline. A non-empty --out is refused unless --force or --resume. Interrupted runs
continue with --resume. The full recipe takes hours on a CPU (docs/train-tiny.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from sglang_indexcache import checks
from sglang_indexcache.commands.options import add_force, check_output, positive_int
from sglang_indexcache.configs import TINY_MODEL_DIR
from sglang_indexcache.errors import UsageError

DEFAULT_OUT = "runs/tiny-glm-dsa"

DEFAULT_STEPS = "2000,300,1000"
DEFAULT_LR = "1e-3,1e-3,5e-4"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="model directory to write (default: %(default)s; must be new or empty unless"
                             " --resume or --force)")
    parser.add_argument("--work-dir", default=".cache/train-tiny",
                        help="training stream, resumable state and logs (default: %(default)s)")
    parser.add_argument("--steps", default=DEFAULT_STEPS,
                        help="steps of the dense, warm-up and sparse stages (default: %(default)s)")
    parser.add_argument("--lr", default=DEFAULT_LR, help="peak learning rate per stage (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=positive_int, default=250, help="steps between saved states")
    parser.add_argument("--log-every", type=positive_int, default=25, help="steps between log lines")
    parser.add_argument("--vocab-size", type=positive_int, default=4096, help="BPE vocabulary size (default: %(default)s)")
    parser.add_argument("--model-json", default="{}",
                        help="JSON overrides of the model shape, e.g. '{\"num_hidden_layers\": 2}'")
    parser.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue the state saved in --work-dir")
    parser.add_argument("--rebuild-corpus", action="store_true", help="rebuild tokenizer and corpus files")
    parser.add_argument("--corpus-only", action="store_true",
                        help="only build the tokenizer, held-out files and training stream, then stop")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    parser.add_argument("--eval-batch-size", type=positive_int, default=4)
    add_force(parser)


def _triple(text: str, kind, name: str) -> list:
    parts = text.split(",")
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values):
        raise UsageError(f"--{name} needs three non-negative numbers 'dense,warmup,sparse', got {text!r}")
    return values


def parse_args(args):
    """``TrainArgs`` from the parsed command line; every bad value is a UsageError."""
    steps = _triple(args.steps, int, "steps")
    lrs = _triple(args.lr, float, "lr")
    try:
        overrides = json.loads(args.model_json)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-json is not valid JSON: {exc}") from exc
    if args.vocab_size < 260 or args.vocab_size > 65535:
        raise UsageError("--vocab-size must lie in 260..65535 (byte alphabet plus merges; uint16 ids)")
    check_output("--work-dir", args.work_dir, "dir", force=True, resume=args.resume,
                 saved_state=Path(args.work_dir) / "state.pt")
    check_output("--out", args.out, "dir", force=args.force, resume=args.resume, protected=(TINY_MODEL_DIR,))
    from sglang_indexcache.training.tiny import MODEL_DEFAULTS, STAGES, TrainArgs

    if not isinstance(overrides, dict) or set(overrides) - set(MODEL_DEFAULTS):
        raise UsageError(f"--model-json takes an object with keys among {', '.join(MODEL_DEFAULTS)}")
    return TrainArgs(
        out_dir=args.out, work_dir=args.work_dir, steps=dict(zip(STAGES, steps)), lr=dict(zip(STAGES, lrs)),
        batch_size=args.batch_size, seq_len=args.seq_len, device=args.device, seed=args.seed,
        save_every=args.save_every, log_every=args.log_every, vocab_size=args.vocab_size, model=overrides,
        bf16=not args.no_bf16,
    )


def run(args) -> int:
    targs = parse_args(args)
    from sglang_indexcache.training import corpus, tiny

    checks.torch_device(targs.device)
    if args.corpus_only:
        tokenizer, stream = corpus.prepare(targs.out_dir, targs.work_dir, targs.vocab_size, args.rebuild_corpus)
        print(json.dumps({"tokenizer": targs.out_dir, "vocab_size": len(tokenizer), "train_tokens": int(stream.size),
                          "stream": str(Path(targs.work_dir) / "train_tokens.npy")}, indent=2))
        return 0
    try:
        summary = tiny.run(targs, resume=args.resume, rebuild_corpus=args.rebuild_corpus,
                           eval_batch_size=None if args.no_eval else args.eval_batch_size)
    except KeyboardInterrupt:
        from sglang_indexcache.errors import Interrupted

        state = Path(targs.work_dir) / "state.pt"
        raise Interrupted(f"the training so far is saved in {state}: the same command with --resume continues"
                          " from the last saved step" if state.is_file() else "") from None
    print(json.dumps({k: summary[k] for k in ("parameters", "stages", "train_seconds", "heldout")
                      if k in summary}, indent=2))
    return 0
