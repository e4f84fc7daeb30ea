"""``make demo``: the main job on the embedded default model.

Until calibration lands this shows the pattern semantics on real DSA shapes: the canonical
``every 4`` pattern, what each engine's ``index_topk_freq=4`` really selects, and validation.
"""

from __future__ import annotations

import sys

from . import pattern as pat
from .configs import NAMED, TINY_MODEL_DIR
from .errors import UsageError


def main() -> int:
    for name, config in NAMED.items():
        layers = config["num_hidden_layers"]
        uniform = pat.uniform(layers, 4)
        print(f"{name} ({layers} DSA layers), keep every 4th indexer:")
        print(f"  canonical every-4        {pat.describe(uniform)}")
        for engine in pat.ENGINES:
            chosen = pat.from_engine_freq(engine, layers, 4)
            print(f"  {engine:12s} freq=4     {pat.describe(chosen)}")
        print(f"  SGLang flag: {pat.export(uniform, 'sglang')}")
        for bad in (pat.SHARED + uniform[1:], uniform[:-1], uniform.lower() + "x"):
            try:
                pat.validate(bad, layers)
            except UsageError as exc:
                print(f"  refused {bad[:12]}...: {exc}")
        print()
    if (TINY_MODEL_DIR / "config.json").is_file():
        from .model_info import load_model_info
        from .validation import check_against_model

        model = load_model_info(TINY_MODEL_DIR)
        pattern = check_against_model(pat.uniform(model.num_dsa_layers, 4), model)
        print(f"embedded model {TINY_MODEL_DIR.name}: every-4 is valid: {pat.describe(pattern)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
