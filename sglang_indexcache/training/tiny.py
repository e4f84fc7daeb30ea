"""Train the embedded tiny ``GlmMoeDsaForCausalLM`` from scratch with the DSA recipe (PAPER.md).

Stages, each with its own AdamW optimiser and warm-up + cosine learning-rate schedule:

1. ``dense``: language-model pre-training with dense (causal) attention; indexers bypassed.
2. ``warmup``: only the indexers train, loss ``KL(p || softmax(I))`` over causal positions, ``p``
   the head-summed, L1-normalised main attention (main model frozen, attention dense).
3. ``sparse``: top-k attention (``index_topk``) through transformers' own forward; LM loss for the
   main model plus the indexer KL restricted to the selected set, the indexer's input detached.

Batches are random ``seq_len`` windows of the EOS-separated training stream; the window offsets of
a step depend only on ``(seed, stage, step)``, so a resumed run sees the same batches. State
(model, optimiser, stage, step) is saved atomically every ``save_every`` steps to
``work_dir/state.pt``; losses are appended to ``work_dir/train_log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sglang_indexcache import progress
from sglang_indexcache.atomic import atomic_path, atomic_write_json, atomic_write_text
from sglang_indexcache.errors import UsageError
from sglang_indexcache.models import swap
from sglang_indexcache.training import dsa_losses

log = logging.getLogger(__name__)
STAGES = ("dense", "warmup", "sparse")
# Keys real GLM-5 configs carry that transformers' GlmMoeDsaConfig does not declare; SGLang reads them.
SGLANG_CONFIG_KEYS = {"moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}

MODEL_DEFAULTS = dict(
    hidden_size=192, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
    v_head_dim=32, index_n_heads=2, index_head_dim=128, index_topk=64, max_position_embeddings=4096,
    n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=128,
)


@dataclass
class TrainArgs:
    out_dir: str
    work_dir: str
    steps: dict = field(default_factory=lambda: {"dense": 2000, "warmup": 300, "sparse": 1000})
    lr: dict = field(default_factory=lambda: {"dense": 1e-3, "warmup": 1e-3, "sparse": 5e-4})
    batch_size: int = 16
    seq_len: int = 1024
    device: str = "cpu"
    seed: int = 0
    save_every: int = 250
    log_every: int = 25
    vocab_size: int = 4096
    model: dict = field(default_factory=dict)  # overrides of MODEL_DEFAULTS
    bf16: bool = True  # autocast on CUDA (the CPU always runs float32)


def build_config(vocab_size: int, eos_token_id: int, overrides: dict | None = None):
    """A ``GlmMoeDsaConfig`` of the tiny shape: all layers dense MLP, every layer's indexer full,
    RoPE as yarn with factor 1.0 (identical to plain RoPE; SGLang's CPU rope accepts only yarn)."""
    from transformers import GlmMoeDsaConfig

    kw = {**MODEL_DEFAULTS, **(overrides or {})}
    layers = kw["num_hidden_layers"]
    max_pos = kw["max_position_embeddings"]
    config = GlmMoeDsaConfig(
        vocab_size=vocab_size, first_k_dense_replace=layers, indexer_types=["full"] * layers,
        tie_word_embeddings=False, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
        rope_parameters={"rope_type": "yarn", "factor": 1.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": max_pos},
        **kw,
    )
    for key, value in SGLANG_CONFIG_KEYS.items():
        setattr(config, key, value)
    return config


def sample_batch(stream: np.ndarray, batch: int, seq_len: int, seed: int, stage: int, step: int) -> torch.Tensor:
    """``[batch, seq_len]`` int64 windows of ``stream`` at offsets fixed by ``(seed, stage, step)``."""
    rng = np.random.default_rng([seed, stage, step])
    starts = rng.integers(0, stream.size - seq_len, size=batch)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the stage, then cosine decay to 10% of ``peak``."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def stage_parameters(model, stage: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` and return the trainable parameters."""
    params = []
    for name, p in model.named_parameters():
        is_indexer = ".indexer." in name
        p.requires_grad_(is_indexer if stage == "warmup" else (not is_indexer if stage == "dense" else True))
        if p.requires_grad:
            params.append(p)
    return params


def make_optimizer(params, lr: float):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, batch, stage: str, wrappers, probe, autocast: bool) -> dict:
    """One forward/backward of ``stage``; returns the step's losses (floats)."""
    device_type = batch.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        # warm-up: the main model's parameters are frozen, so only the indexer scores get a graph
        out = model(input_ids=batch, labels=batch)
    stats = {"lm": float(out.loss.detach())}
    loss = out.loss if stage != "warmup" else None
    if stage in ("warmup", "sparse"):
        kls = dsa_losses.indexer_losses(wrappers, probe)
        kl = torch.stack(kls).mean()
        stats["kl"] = float(kl.detach())
        stats["kl_layers"] = [round(float(k.detach()), 4) for k in kls]
        loss = kl if loss is None else loss + kl
    loss.backward()
    return stats


def save_state(path: Path, model, optimizer, stage_idx: int, step: int, args: TrainArgs) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stage": stage_idx,
                    "step": step, "args": asdict(args)}, tmp)


def log_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def run_stage(model, stream, args: TrainArgs, stage_idx: int, start_step: int, state: dict | None) -> dict:
    """Train one stage from ``start_step``; returns the mean losses of its last ``log_every`` steps."""
    stage = STAGES[stage_idx]
    total = args.steps[stage]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("sdpa" if stage == "dense" else "eager")
    wrappers = swap.wrap_indexers(model, dsa_losses.TrainIndexer, require_all=True, mode=stage)
    probe = dsa_losses.AttentionProbe(model) if stage != "dense" else None
    optimizer = make_optimizer(stage_parameters(model, stage), args.lr[stage])
    if state is not None and state.get("stage") == stage_idx:
        optimizer.load_state_dict(state["optimizer"])
    device = torch.device(args.device)
    autocast = args.bf16 and device.type == "cuda"
    recent: list[dict] = []
    bar = progress.bar(range(start_step, total), total=total, initial=start_step, desc=f"train-tiny {stage}")
    t0 = time.perf_counter()
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, args.lr[stage])
            batch = sample_batch(stream, args.batch_size, args.seq_len, args.seed, stage_idx, step).to(device)
            optimizer.zero_grad(set_to_none=True)
            stats = train_step(model, batch, stage, wrappers, probe, autocast)
            norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            if torch.isfinite(norm):
                optimizer.step()
            else:  # a non-finite gradient would poison the weights: skip the update, count it
                stats["skipped"] = 1.0
                log.warning("%s step %d: non-finite gradient norm, update skipped", stage, step + 1)
            recent = (recent + [stats])[-args.log_every:]
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                record = {"stage": stage, "step": step + 1, "lr": optimizer.param_groups[0]["lr"],
                          "seconds": round(time.perf_counter() - t0, 2), **_mean(recent)}
                log_line(work / "train_log.jsonl", record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("lm", "kl")})
                log.info("%s step %d/%d %s", stage, step + 1, total, json.dumps(_mean(recent)))
            if (step + 1) % args.save_every == 0 or step + 1 == total:
                save_state(work / "state.pt", model, optimizer, stage_idx, step + 1, args)
    finally:
        bar.close()
        if probe is not None:
            probe.remove()
    return _mean(recent)


def _mean(records: list[dict]) -> dict:
    out: dict = {}
    skipped = sum(r.get("skipped", 0.0) for r in records)
    if skipped:
        out["skipped"] = skipped
    for key in ("lm", "kl"):
        vals = [r[key] for r in records if key in r]
        if vals:
            out[key] = round(sum(vals) / len(vals), 4)
    layers = [r["kl_layers"] for r in records if "kl_layers" in r]
    if layers:
        out["kl_layers"] = [round(sum(col) / len(col), 4) for col in zip(*layers)]
    return out


def train(args: TrainArgs, stream: np.ndarray, tokenizer, resume: bool = False) -> dict:
    """Run (or resume) all stages; save the final bf16 model to ``args.out_dir``; return a summary."""
    from transformers import GlmMoeDsaForCausalLM

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    state = None
    if state_path.exists():
        if not resume:
            raise UsageError(f"{state_path} exists: pass --resume to continue it, or choose another --work-dir")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    elif resume:
        log.warning("--resume given but %s does not exist: starting from scratch", state_path)
    if stream.size <= args.seq_len + 1:
        raise UsageError(f"training stream has {stream.size} tokens, fewer than one sequence of {args.seq_len}")
    torch.manual_seed(args.seed)
    config = build_config(len(tokenizer), tokenizer.eos_token_id, args.model)
    model = GlmMoeDsaForCausalLM(config)
    if state is not None:
        swap.wrap_indexers(model, dsa_losses.TrainIndexer, require_all=True)  # the state's parameter names
        model.load_state_dict(state["model"])
        swap.unwrap_indexers(model)
    model.to(args.device).train()
    summary = {"parameters": sum(p.numel() for p in model.parameters()), "stages": {}}
    start_stage = state["stage"] if state else 0
    for stage_idx in range(start_stage, len(STAGES)):
        stage = STAGES[stage_idx]
        start = state["step"] if state and state["stage"] == stage_idx else 0
        if start >= args.steps[stage]:
            continue
        t0 = time.perf_counter()
        losses = run_stage(model, stream, args, stage_idx, start, state)
        summary["stages"][stage] = {"steps": args.steps[stage], "seconds": round(time.perf_counter() - t0, 1),
                                    "final": losses}
        state = None
    swap.unwrap_indexers(model)
    save_model(model, args.out_dir)
    return summary


def run(args: TrainArgs, resume: bool = False, rebuild_corpus: bool = False, eval_batch_size: int | None = 4) -> dict:
    """The whole recipe: the corpus (built unless present: ``corpus.prepare``), the three stages
    (:func:`train`), then the held-out losses (``evaluate.heldout_losses``; none when
    ``eval_batch_size`` is None). The summary is written to ``work_dir/summary.json`` and returned."""
    from sglang_indexcache.training import corpus, evaluate

    t0 = time.perf_counter()
    tokenizer, stream = corpus.prepare(args.out_dir, args.work_dir, args.vocab_size, rebuild_corpus)
    summary = train(args, stream, tokenizer, resume=resume)
    summary["train_seconds"] = round(time.perf_counter() - t0, 1)
    summary["args"] = dict(vars(args))
    if eval_batch_size is not None:
        summary["heldout"] = evaluate.heldout_losses(args.out_dir, stream, args.device, eval_batch_size, args.seq_len)
    atomic_write_json(Path(args.work_dir) / "summary.json", summary, indent=2)
    return summary


def save_model(model, out_dir) -> None:
    """Save in bf16 with every layer's indexer (``indexer_types`` all full) and SGLang's keys."""
    out = Path(out_dir)
    model = model.to("cpu", torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    model.config.indexer_types = ["full"] * model.config.num_hidden_layers
    for key, value in SGLANG_CONFIG_KEYS.items():
        setattr(model.config, key, value)
    model.save_pretrained(out)  # the tokenizer is already there: the corpus step writes it
    config = json.loads((out / "config.json").read_text())
    missing = [k for k in SGLANG_CONFIG_KEYS if config.get(k) != SGLANG_CONFIG_KEYS[k]]
    if missing:  # transformers dropped undeclared keys: add them back
        config.update(SGLANG_CONFIG_KEYS)
        atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
