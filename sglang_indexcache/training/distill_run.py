"""A whole distillation run: data, LM loss before/after, training loop, checkpoints, report.

``run(DistillConfig)`` is what ``indexcache distill`` calls. Layout of ``out``::

    out/                      the new HF checkpoint (only the F layers' indexer tensors differ)
    out/pattern.json          indexcache-pattern/v1 file, method "distilled"
    out/distill/state.pt      resumable state (step, indexer tensors, optimizer, loss history)
    out/distill/report.json   settings, LM losses before/after, loss history, wall times
    out/distill/loss.png      loss curve

The state is written atomically every ``save_every`` steps; ``resume=True`` continues from it
(the run's settings must match; ``steps`` may grow). Batches are a pure function of
``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import pattern as pattern_mod
from .. import checks, pattern_file, progress
from ..atomic import atomic_write_text, staged_dir
from ..errors import DataError, ModelDirError, UsageError
from ..models import lm_loss
from . import distill_io
from .distill import Distiller

log = logging.getLogger(__name__)
REPORT_FORMAT = "indexcache-distill-report/v1"
# settings that must match when resuming (steps may grow; save_every/eval sizes may change)
RESUME_KEYS = ("pattern", "form", "single_layer", "lr", "batch_size", "seq_len", "seed", "fingerprint",
               "data_sha256")


@dataclass
class DistillConfig:
    model: str
    pattern: str
    data: str
    out: str
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 512
    form: str = "warmup"
    single_layer: bool = False
    resume: bool = False
    eval_data: str | None = None
    eval_tokens: int = 32768
    train_tokens: int | None = None
    text_field: str = "text"
    seed: int = 0
    save_every: int = 20
    force: bool = False  # write into a non-empty --out (the CLI checked it is no input)


def _check(cfg: DistillConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "save_every", "eval_tokens"):
        checks.positive_int(getattr(cfg, name), "--" + name.replace("_", "-"))
    if not cfg.lr > 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr!r}")


def batch_indices(seed: int, step: int, n_blocks: int, batch_size: int) -> list[int]:
    """Block indices of ``step``'s batch: epochs of a seeded permutation, a pure function of step."""
    out, perms = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_blocks)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


def _lm_losses(backend, blocks, patterns: dict[str, str], batch_size: int) -> dict[str, float]:
    """LM loss (nats/token) of ``blocks [n, S]`` per labelled pattern (eager attention, which is
    also the faster one on the CPU for these masked shapes)."""
    losses = lm_loss.pattern_losses(backend.set_pattern, backend.batch_nll, blocks, patterns, batch_size)
    return {label: result.mean for label, result in losses.items()}


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelDirError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(model_dir))


def _load_data(cfg: DistillConfig, tokenizer):
    from ..calibration.data import load_blocks

    train = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.train_tokens, cfg.text_field)
    if cfg.eval_data is not None:
        held_out = load_blocks(cfg.eval_data, tokenizer, cfg.seq_len, cfg.eval_tokens, cfg.text_field)
        return train, held_out.input_ids, held_out.describe()
    n = train.input_ids.shape[0]
    n_eval = min(max(1, n // 10), max(1, cfg.eval_tokens // cfg.seq_len))
    if n - n_eval < 1:
        raise DataError(f"{cfg.data} gives {n} block(s) of {cfg.seq_len} tokens: too few to hold out"
                        " evaluation blocks; give --eval-data or more text")
    train_ids, eval_ids = train.input_ids[: n - n_eval], train.input_ids[n - n_eval:]
    eval_desc = {"source": f"{cfg.data} (last {n_eval} blocks, held out)", "tokens": int(eval_ids.numel())}
    return replace(train, input_ids=train_ids, tokens=int(train_ids.numel())), eval_ids, eval_desc


def _prepare_out(cfg: DistillConfig) -> dict | None:
    out, state_path = Path(cfg.out), Path(cfg.out) / "distill" / "state.pt"
    if cfg.resume and state_path.is_file():
        return distill_io.load_state(state_path)
    if out.exists() and any(out.iterdir()) and not cfg.force:
        if cfg.resume:
            raise UsageError(f"--resume: {out} is not empty but has no distillation state ({state_path})")
        raise UsageError(f"--out {out} exists and is not empty; pass --resume to continue a run there,"
                         " or choose a new directory")
    if cfg.resume:
        log.info("no distillation state in %s: starting from step 0", out)
    return None


def _check_resume(state: dict, settings: dict) -> None:
    for key in RESUME_KEYS:
        if state["settings"].get(key) != settings.get(key):
            raise UsageError(f"cannot resume: {key} was {state['settings'].get(key)!r} in the saved run,"
                             f" now {settings.get(key)!r}")


def _train(cfg, distiller, train, state, save, bar_desc) -> None:
    """Steps ``state["step"]..cfg.steps`` with Adam on the F layers' indexers; saves every save_every."""
    params = distiller.parameters()
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    if state.get("indexers"):
        with torch.no_grad():
            for name, value in state["indexers"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    n_blocks = train.input_ids.shape[0]
    start = state["step"]
    bar = progress.bar(range(start, cfg.steps), total=cfg.steps, initial=start, desc=bar_desc)
    for step in bar:
        t0 = time.perf_counter()
        ids = train.input_ids[batch_indices(cfg.seed, step, n_blocks, cfg.batch_size)]
        losses = distiller.step(ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = sum(losses.values())
        state["history"].append({"step": step + 1, "loss": total, "layers": {str(k): v for k, v in losses.items()}})
        bar.set_postfix(kl=f"{total:.4f}")
        state["step"] = step + 1
        state["train_seconds"] = state.get("train_seconds", 0.0) + time.perf_counter() - t0
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            state["indexers"] = {k: v.detach().clone() for k, v in params.items()}
            state["optimizer"] = optimizer.state_dict()
            save(state)


def run(cfg: DistillConfig) -> dict:
    """Run (or resume) a distillation; returns the report (also written to ``out/distill/report.json``)."""
    from ..calibration.backend import TransformersBackend
    from ..model_info import load_model_info

    _check(cfg)
    info = load_model_info(Path(cfg.model))
    pattern = pattern_file.resolve(cfg.pattern, info.num_dsa_layers, info)
    state = _prepare_out(cfg)
    train, eval_ids, eval_desc = _load_data(cfg, _tokenizer(cfg.model))
    if not progress.enabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    backend = TransformersBackend.from_pretrained(cfg.model, pattern=pattern, attn_implementation="eager")
    settings = {"pattern": pattern, "form": cfg.form, "single_layer": cfg.single_layer, "lr": cfg.lr,
                "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed,
                "fingerprint": info.fingerprint(), "data_sha256": train.sha256}
    distiller = Distiller(backend.model, pattern, cfg.form, cfg.single_layer, indexers=backend.indexers)
    distiller.freeze()
    if state is None:
        t0 = time.perf_counter()
        before = _lm_losses(backend, eval_ids, {"all_f": pattern_mod.all_full(info.num_dsa_layers), "pattern": pattern},
                            cfg.batch_size)
        state = {"settings": settings, "step": 0, "history": [], "before": before,
                 "eval_seconds": time.perf_counter() - t0}
    else:
        _check_resume(state, settings)
        log.info("resuming %s at step %d of %d", cfg.out, state["step"], cfg.steps)
    state_path = Path(cfg.out) / "distill" / "state.pt"
    save = lambda s: distill_io.save_state(state_path, s)  # noqa: E731
    save(state)
    backend.set_pattern(pattern)
    _train(cfg, distiller, train, state, save, "distill" + (" (single-layer)" if cfg.single_layer else ""))
    distill_io.round_to_stored(cfg.model, distiller.parameters())
    t0 = time.perf_counter()
    after = _lm_losses(backend, eval_ids, {"pattern": pattern}, cfg.batch_size)
    state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - t0
    return _finish(cfg, info, pattern, distiller, state, after, train, eval_desc)


def _finish(cfg, info, pattern, distiller, state, after, train, eval_desc) -> dict:
    """Write the checkpoint, its README, pattern.json and distill/{report.json, loss.png}: staged
    beside ``out`` and moved in together, so Ctrl-C leaves either all of them or none (the state
    file stays, and --resume finishes the run)."""
    from ..model_info import load_model_info

    out = Path(cfg.out)
    before = state["before"]
    gap = before["pattern"] - before["all_f"]
    label = f"{'single-layer' if cfg.single_layer else 'multi-layer'} {cfg.form}, {pattern}"
    with staged_dir(out) as staged:
        tensors = {k: v.detach() for k, v in distiller.parameters().items()}
        rewritten = distill_io.write_checkpoint(cfg.model, staged, tensors)
        report = {
            "format": REPORT_FORMAT,
            "model": str(cfg.model), "out": str(out), "pattern": pattern, "describe": pattern_mod.describe(pattern),
            "settings": {**asdict(cfg), **state["settings"]},
            "data": train.describe(), "eval_data": eval_desc,
            "lm_loss": {"all_f_before": before["all_f"], "pattern_before": before["pattern"],
                        "pattern_after": after["pattern"]},
            "gap_closed": (before["pattern"] - after["pattern"]) / gap if gap > 0 else None,
            "distill_loss": {"first": state["history"][0]["loss"] if state["history"] else None,
                             "last": state["history"][-1]["loss"] if state["history"] else None},
            "steps": state["step"], "train_seconds": state.get("train_seconds", 0.0),
            "eval_seconds": state.get("eval_seconds", 0.0), "torch_threads": torch.get_num_threads(),
            "rewritten_shards": rewritten, "history": state["history"],
        }
        document = pattern_file.make_document(
            pattern, load_model_info(staged), method="distilled", keep_ratio=pattern_mod.kept(pattern) / len(pattern),
            data=train.describe(), baseline_loss=before["all_f"], loss=after["pattern"], distill_form=cfg.form,
            single_layer=cfg.single_layer, steps=state["step"])
        pattern_file.write(staged / "pattern.json", document)
        atomic_write_text(staged / "README.md", distill_io.model_card(report))
        if state["history"]:
            distill_io.plot_losses(state["history"], staged / "distill" / "loss.png", label)
        atomic_write_text(staged / "distill" / "report.json", json.dumps(report, indent=2) + "\n")
    return report
