"""Exact resume and safe checkpoints: RNG states in the checkpoint, atomic writes, weights-only loading.

A run killed at any point resumes from its last checkpoint (`ckpt_path=last`) and continues exactly as the
uninterrupted run would on CPU: model, reference model, optimizer and scheduler (Lightning), the completed RL steps
(the prompt sampler skips them), and every random stream (torch, Python, NumPy and the module's own generator).
Checkpoints are written to a temporary file and renamed, and read back with `weights_only=True`; a truncated or
foreign file fails with one clear line instead of being loaded.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from seqrl.results import atomic_write


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream a training step reads, as plain tensors and numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(), "module": gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["module"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, gauss_next = state["python"]
    random.setstate((3, tuple(keys), gauss_next))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file: temporary file, fsync, rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f), mode="wb")


def resolve_ckpt(ckpt_path: str | None, out_dir: Path) -> str | None:
    """`last` -> the run dir's checkpoints/last.ckpt; any checkpoint is test-loaded (weights only) so a corrupt or
    truncated file fails here with one line, before training starts."""
    if ckpt_path is None:
        return None
    path = out_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    sharded = path.is_dir() and (path / "meta.pt").is_file()  # FSDP: a folder, one file per rank + meta.pt
    if not (path.is_file() or sharded):
        raise ValueError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}")
    try:
        torch.load(path / "meta.pt" if sharded else path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be trusted
        raise ValueError(f"ckpt_path={ckpt_path!r}: {path} is corrupt or not a seqrl checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    return str(path)
