"""Files of a distillation run: the output checkpoint, the resumable state, the loss-curve plot.

The output checkpoint is the input one with only the trained tensors replaced: every other file is
copied byte for byte, shards that hold no trained tensor are copied, and in a shard that does, all
other tensors are written back with their original bytes and dtype (and the shard's metadata).
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelDirError
from ..pattern_file import new_file_mode

STATE_FORMAT = "indexcache-distill-state/v1"


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp (and safetensors) make 0600; a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        with _atomic_path(out / path.name) as tmp:
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
    with _atomic_path(Path(path)) as tmp:
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
    with _atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
