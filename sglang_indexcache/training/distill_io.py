"""Files of a distillation run: the output checkpoint, the resumable state, the loss-curve plot.

The output checkpoint is the input one with only the trained tensors replaced: every other file is
copied byte for byte, shards that hold no trained tensor are copied, and in a shard that does, all
other tensors are written back with their original bytes and dtype (and the shard's metadata).
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..atomic import atomic_path, atomic_savefig
from ..errors import ModelDirError

STATE_FORMAT = "indexcache-distill-state/v1"


def _shard_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def write_checkpoint(src_dir, out_dir, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy the HF checkpoint ``src_dir`` to ``out_dir`` with ``tensors`` (name -> value) replaced.

    Top-level files only (config, tokenizer, safetensors shards and their index); sub-folders are
    not part of a checkpoint and are not copied. Each replaced tensor keeps the dtype and shape
    stored in ``src_dir``. Returns the names of the shards that were rewritten. Raises
    :class:`ModelDirError` if a name is not in the checkpoint or a shape differs.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    if src.resolve() == out.resolve():
        raise ModelDirError(f"--out {out} is the input model directory; choose a new directory")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ModelDirError(f"{src} has no .safetensors weights")
    remaining, rewritten = set(tensors), []
    for path in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")):
        names = set(_shard_names(path)) & set(tensors) if path.suffix == ".safetensors" else set()
        with atomic_path(out / path.name) as tmp:
            if not names:
                shutil.copyfile(path, tmp)
                continue
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
                stored = {name: f.get_tensor(name) for name in f.keys()}
            for name in names:
                old, new = stored[name], tensors[name]
                if tuple(old.shape) != tuple(new.shape):
                    raise ModelDirError(f"{name}: trained shape {tuple(new.shape)} != stored {tuple(old.shape)}")
                stored[name] = new.detach().to(device="cpu", dtype=old.dtype).contiguous()
            save_file(stored, str(tmp), metadata=metadata)
        remaining -= names
        rewritten.append(path.name)
    if remaining:
        raise ModelDirError(f"{src}: tensors not found in the checkpoint: {sorted(remaining)[:3]}")
    return rewritten


def stored_dtypes(model_dir) -> dict[str, torch.dtype]:
    """dtype of every tensor stored in the checkpoint's safetensors shards (headers only)."""
    from safetensors import safe_open

    dtypes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                dtypes[name] = f.get_slice(name).get_dtype()
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return {name: names.get(dtype, torch.float32) for name, dtype in dtypes.items()}


@torch.no_grad()
def round_to_stored(model_dir, params: dict[str, torch.nn.Parameter]) -> None:
    """Round trained parameters to the dtype the checkpoint stores them in (e.g. bf16), in place,
    so that the LM loss measured after training is the loss of the checkpoint written."""
    dtypes = stored_dtypes(model_dir)
    for name, param in params.items():
        param.copy_(param.to(dtypes.get(name, param.dtype)).to(param.dtype))


def save_state(path, state: dict) -> None:
    """Atomically ``torch.save`` the resumable state (a dict of tensors, numbers, strings)."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_state(path) -> dict:
    from ..errors import UsageError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read distillation state {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UsageError(f"{path} is not a distillation state ({STATE_FORMAT})")
    return state


def plot_losses(history: list[dict], path, title: str) -> None:
    """Loss curve PNG: total (sum over F layers) and per-F-layer nats/token vs step.

    history: ``[{"step": i, "loss": total, "layers": {"l": nats, ...}}, ...]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], color="black", lw=1.5, label="sum over F layers")
    for layer in sorted(history[0]["layers"], key=int) if history else []:
        ax.plot(steps, [h["layers"][layer] for h in history], lw=0.8, alpha=0.7, label=f"F layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation KL (nats / query token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def model_card(report: dict) -> str:
    """README.md of a distilled checkpoint: what it is, how it was made, what it measured (the base
    model's own card describes another model and is not kept)."""
    loss, settings = report["lm_loss"], report["settings"]
    base, out = Path(report["model"]), Path(report["out"])
    gap = report["gap_closed"]
    return "\n".join([
        f"# {out.name}: {base.name} with distilled IndexCache indexers",
        "",
        f"This checkpoint is `{base}` with the lightning indexers of the F layers of the IndexCache pattern",
        f"`{report['pattern']}` ({report['describe']}) trained by `indexcache distill`",
        f"({'single-layer' if settings['single_layer'] else 'multi-layer'} distillation, form"
        f" `{settings['form']}`, {report['steps']} steps, lr {settings['lr']:g}, batch {settings['batch_size']}"
        f" x {settings['seq_len']} tokens of `{report['data']['source']}`). Every other tensor, the config",
        "and the tokenizer are those of the base model; the S layers reuse the top-k of the F layer before them.",
        "",
        f"LM loss (nats/token) on {report['eval_data']['source']}: all-F {loss['all_f_before']:.4f} (base model),",
        f"pattern before distillation {loss['pattern_before']:.4f}, after {loss['pattern_after']:.4f}"
        + (f" (gap closed {100 * gap:.0f}%)." if gap is not None else "."),
        "",
        "Use it with its pattern (`pattern.json`, method `distilled`):",
        "",
        f"    indexcache serve --model {out} --pattern-file {out / 'pattern.json'}",
        "",
        "Settings, loss history and timings: `distill/report.json`. The base model's own card:",
        f"`{base / 'README.md'}`.",
        "",
    ])
