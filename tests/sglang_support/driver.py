"""Run SGLang cases (0.5.17 or 0.5.23) on the CPU in this process; used by the tests in a fresh subprocess.

``python driver.py CASES.json RESULTS.json`` with ``PYTHONPATH`` pointing at a stock or patched
SGLang tree. Each case is ``{"argv": [...], "build": bool, "switch": [patterns]}``; its result:

- ``error``: ``{"type", "message"}`` when parsing, resolution or loading refused the case
  (argparse's exit is reported as type ``SystemExit`` with its stderr line);
- ``skips``: ``dsa_layer_skips_topk(hf_config, i)`` for every layer of the resolved ModelConfig;
- ``args``: the resolved arguments as JSON-able values (0.5.23: ``server_args.resolved_dict()``;
  0.5.17, which resolves in ``__post_init__``: the fields), ``index_cache_*`` fields dropped, so
  stock and patched compare directly;
- ``layers`` (with ``build``): per layer ``[skip_topk, next_skip_topk, has_indexer,
  indexer weights equal to the checkpoint's]`` after SGLang's own ``load_weights``;
  ``load_warnings``: what the weight loader warned about indexer weights;
- ``draft`` (with ``draft``): the MTP/NextN model's config key and indexer (``_draft``);
- ``pool`` (with ``pool``): the release's own KV-pool sizing and DSA pool (``pool_driver.py``);
- ``switched`` (with ``switch``): per requested pattern, the layers after the overlay's switch
  function, or its error; ``logs``: the overlay's log lines.

The recipe (FACTS.md): SGLANG_USE_CPU_ENGINE=1, SGLang's sgl_kernel stub, device capability (9, 0)
during resolution, runtime context published, a world of one process over gloo.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import sys
import traceback

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"

import torch  # noqa: E402

OUR_FIELDS = ("index_cache_pattern", "index_cache_every", "index_cache_pattern_file", "index_cache_calibration",
              "index_cache_decode_stride")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _jsonable(value):
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _setup():
    from sglang.test.test_utils import maybe_stub_sgl_kernel

    maybe_stub_sgl_kernel()
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # DSA hooks ask unconditionally


_DIST = {"ready": False}


def _init_dist():
    if _DIST["ready"]:
        return
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(backend="gloo")
    _DIST["ready"] = True


def _layers(model, state_dict):
    rows = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        equal = None
        if attn.indexer is not None:
            prefix = f"model.layers.{i}.self_attn.indexer."
            params = dict(attn.indexer.named_parameters())
            names = [n for n in state_dict if n.startswith(prefix)]
            equal = bool(names) and all(
                n[len(prefix):] in params and torch.equal(params[n[len(prefix):]].detach().cpu(),
                                                            state_dict[n].to(params[n[len(prefix):]].dtype))
                for n in names)
        rows.append([attn.skip_topk, attn.next_skip_topk, attn.indexer is not None, equal])
    return rows


def _resolve(server_args) -> dict:
    """Finish resolution, publish the runtime context, return the resolved arguments (per release)."""
    from sglang.srt import runtime_context

    if hasattr(server_args, "resolve_once"):  # 0.5.23: lazy resolution, then publish
        server_args.resolve_once()
        runtime_context.publish(server_args, role="scheduler",
                                ranks=runtime_context.SpawnRanks(world_rank=0, gpu_id=0))
        return server_args.resolved_dict()
    import dataclasses  # 0.5.17: __post_init__ has resolved every field

    runtime_context.publish(server_args, role="scheduler")
    return {f.name: getattr(server_args, f.name) for f in dataclasses.fields(server_args)}


def _model_config(server_args):
    from sglang.srt import runtime_context

    if hasattr(runtime_context, "process_model_config"):
        return runtime_context.process_model_config()
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig.from_server_args(server_args)


def _runtime(server_args):
    """A world of one process and (0.5.17) the attention-DP state the model runner sets up; the config."""
    _init_dist()
    config = _model_config(server_args)
    from sglang.srt.layers import dp_attention

    if getattr(dp_attention, "_ATTN_DP_SIZE", 1) is None:  # 0.5.17: the model runner sets it up
        dp_attention.initialize_dp_attention(server_args, config)
    return config


def _draft(server_args) -> dict:
    """The MTP/NextN side: the draft's own ModelConfig, and SGLang's NextN class built from the
    *target's* config (the worst case: it carries the pattern key) with its decoder's indexer."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.models.glm4_moe import GlmMoeDsaForCausalLMNextN
    from sglang_indexcache.sglang_overlay.shared_layers import CONFIG_KEY

    target = _runtime(server_args)
    draft = ModelConfig.from_server_args(server_args, is_draft_model=True)
    with set_default_torch_dtype(target.dtype):
        model = GlmMoeDsaForCausalLMNextN(target.hf_config, quant_config=None)
    attn = model.model.decoder.self_attn
    return {"target_key": getattr(target.hf_config, CONFIG_KEY, None),
            "draft_key": getattr(draft.hf_config, CONFIG_KEY, None),
            "indexer": attn.indexer is not None, "skip_topk": attn.skip_topk}


def _build(result, case):
    from safetensors.torch import load_file
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.models.glm4_moe import GlmMoeDsaForCausalLM

    config = _runtime(result["_server_args"])
    with set_default_torch_dtype(config.dtype):
        model = GlmMoeDsaForCausalLM(config.hf_config, quant_config=None)
    state_dict = load_file(os.path.join(case["argv"][case["argv"].index("--model-path") + 1], "model.safetensors"))
    model.load_weights(iter(state_dict.items()))
    result["layers"] = _layers(model, state_dict)
    if case.get("switch"):
        from sglang_indexcache.sglang_overlay import runtime

        class _Runner:  # what ModelRunner.load_model hands the overlay
            is_draft_worker = False

        runner = _Runner()
        runner.model, runner.server_args = model, result.pop("_server_args")
        runtime.on_model_loaded(runner)
        result["layers_after_load"] = _layers(model, state_dict)
        result["switched"] = []
        for pattern in case["switch"]:
            try:
                runtime.apply_pattern(model, pattern)
                result["switched"].append({"pattern": pattern, "layers": _layers(model, state_dict)})
            except Exception as exc:  # noqa: BLE001 - reported to the test
                result["switched"].append({"pattern": pattern, "error": str(exc),
                                           "layers": _layers(model, state_dict)})


def run_case(case) -> dict:
    from sglang.srt.configs.model_config import ModelConfig, dsa_layer_skips_topk
    from sglang.srt.server_args import prepare_server_args

    result = {}
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            server_args = prepare_server_args(case["argv"])
        resolved = _resolve(server_args)
        hf_config = ModelConfig.from_server_args(server_args).hf_config
        result["skips"] = [dsa_layer_skips_topk(hf_config, i) for i in range(hf_config.num_hidden_layers)]
        result["args"] = {k: _jsonable(v) for k, v in resolved.items() if k not in OUR_FIELDS}
        result["ours"] = {k: _jsonable(resolved[k]) for k in OUR_FIELDS if k in resolved}
        result["declared"] = sorted({source for source, _ in getattr(server_args, "_resolved_overrides", [])})
        result["_server_args"] = server_args
        if case.get("build"):
            _build(result, case)
        if case.get("draft"):
            result["draft"] = _draft(server_args)
        if case.get("pool"):
            import pool_driver

            result["pool"] = pool_driver.run(server_args, _runtime(server_args), case["pool"])
    except SystemExit as exc:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        result["error"] = {"type": "SystemExit", "message": lines[-1] if lines else str(exc.code)}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = {"type": type(exc).__name__, "message": str(exc),
                           "traceback": traceback.format_exc(limit=3)}
    result.pop("_server_args", None)
    return result


def main(cases_path, results_path):
    _setup()
    capture, loader = _Capture(), _Capture()
    logging.getLogger("sglang_indexcache").addHandler(capture)
    logging.getLogger("sglang_indexcache").setLevel(logging.INFO)
    logging.getLogger("sglang.srt.models").addHandler(loader)  # the weight loaders' warnings
    results = []
    for case in json.loads(open(cases_path).read()):
        capture.lines, loader.lines = [], []
        result = run_case(case)
        result["logs"] = list(capture.lines)
        result["load_warnings"] = [line for line in loader.lines if "indexer" in line]
        results.append(result)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
