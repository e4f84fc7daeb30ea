"""Write a GLM-5-attention DSA checkpoint at real shapes with random bf16 weights.

GLM-5's attention and indexer (64 heads, q_lora 2048, kv_lora 512, qk_nope 192, rope 64, v_head 256,
indexer 32 x 128, top-k 2048), --layers layers each with a dense MLP, max_position_embeddings
202752, the embedded model's tokenizer, config.json with torch_dtype bfloat16 and the fields SGLang's
DeepseekV2 code reads. --flavour plain: no pattern in config.json; own-pattern: config.json carries
index_topk_pattern P (SGLang 0.5.17) and indexer_types (0.5.23, transformers); glm52: as
own-pattern, without the S layers' indexer weights. --weights none writes config and tokenizer only
(serve with --load-format dummy); --weights indexer adds the indexer tensors alone (random), which
commands that read the checkpoint's indexer weights (calibrate --url) need. See docs/gpu.md.
"""

from __future__ import annotations

import json

from .. import checkpoint_writer, pattern_file
from ..errors import UsageError


def add_arguments(parser):
    parser.add_argument("out", metavar="OUT", help="new or empty model directory")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (2048 30B-like, 6144 GLM-5)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, help="dense MLP size (default 2.75 x hidden, 5632 at 2048)")
    parser.add_argument("--flavour", choices=checkpoint_writer.FLAVOURS, default="plain")
    parser.add_argument("--pattern", metavar="P", help="pattern, every-N or all-F (own-pattern, glm52)")
    parser.add_argument("--weights", choices=checkpoint_writer.WEIGHTS, default="random",
                        help="random: every tensor; indexer: the indexer tensors only; none: config and tokenizer")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where weights are drawn")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    for name in ("hidden", "layers", "intermediate"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    from ..configs import TINY_MODEL_DIR
    from .options import check_output

    check_output("OUT", args.out, "dir", inputs=(TINY_MODEL_DIR,))  # the tokenizer is read from there
    pattern = pattern_file.resolve(args.pattern, args.layers) if args.pattern else None
    intermediate = args.intermediate or args.hidden * 11 // 4
    summary = checkpoint_writer.write_checkpoint(
        args.out, args.hidden, args.layers, intermediate, args.flavour, pattern, args.weights, args.device,
        seed=args.seed)
    print(json.dumps(summary))
    return 0
