"""Crash-safe checkpoints of a model and its optimizer with ``torch.distributed.checkpoint``.

A checkpoint is never written over the one a run would resume from. :func:`save` writes step
``t`` into a new directory ``root/step-<t>``, and only when every rank has finished (DCP's own
collective commit wrote ``.metadata``) does rank 0 switch the pointer ``root/latest``: a small
file written beside it, flushed to disk, and renamed over it with ``os.replace`` (atomic on
POSIX file systems). A crash at any moment leaves ``latest`` naming a complete checkpoint, or
absent before the first one; :func:`load_latest` resumes from it. Directories the pointer no
longer names are removed after the switch (all but the ``keep`` newest complete ones).

The layout is DCP's, so a checkpoint saved in any mode and with any number of processes loads in
any other (docs/distributed.md). Every rank must see the same ``root`` (a shared file system
when ranks span machines).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["POINTER", "latest", "load_latest", "save"]

POINTER = "latest"
_PREFIX = "step-"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def latest(root: str | os.PathLike[str]) -> tuple[Path, int] | None:
    """The directory and step that ``root/latest`` names, or ``None`` when there is no checkpoint yet."""
    pointer = Path(root) / POINTER
    if not pointer.exists():
        return None
    record = json.loads(pointer.read_text())
    return Path(root) / record["directory"], int(record["step"])


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        **(extra or {}),
    }


def save(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save ``model`` and ``optimizer`` (and ``extra``: tensors or ``Stateful`` objects) as step
    ``step`` under ``root``, then point ``root/latest`` at it; every rank must call it.

    Costs: DCP's save (each rank writes its shards), two barriers, and on rank 0 one small file
    written, flushed and renamed. Returns the new checkpoint's directory.

    Raises ``ValueError`` when ``step`` is not a non-negative integer, ``keep < 1``, or ``step``
    is the checkpoint ``latest`` already names (it is never overwritten).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep!r}")
    root = Path(root)
    directory = root / f"{_PREFIX}{step:09d}"
    current = latest(root)
    if current is not None and current[0] == directory:
        raise ValueError(f"step {step} is the checkpoint {POINTER!r} names in {root}; it is never overwritten")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory, ignore_errors=True)  # what a crash left of an earlier try at this step
    _barrier()
    dcp.save(_state(model, optimizer, extra), checkpoint_id=directory, no_dist=not _distributed())
    _barrier()  # every rank wrote its part and DCP's metadata exists: the checkpoint is complete
    if _rank() == 0:
        pending = root / f".{POINTER}.tmp"
        with open(pending, "w") as f:
            json.dump({"directory": directory.name, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pending, root / POINTER)
        handle = os.open(root, os.O_RDONLY)
        try:
            os.fsync(handle)  # the rename itself reaches the disk
        finally:
            os.close(handle)
        _prune(root, directory, keep)
    _barrier()
    return directory


def _prune(root: Path, current: Path, keep: int) -> None:
    """Remove checkpoint directories older than the ``keep`` newest complete ones, and any
    incomplete one other than ``current``."""
    steps = sorted((p for p in root.glob(f"{_PREFIX}*") if p.is_dir()), key=lambda p: p.name, reverse=True)
    complete = [p for p in steps if (p / ".metadata").exists()]
    kept = set(complete[:keep]) | {current}
    for path in steps:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def load_latest(
    root: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: dict[str, Any] | None = None,
) -> int | None:
    """Load the checkpoint ``root/latest`` names into ``model``, ``optimizer`` and ``extra`` (in
    place) and return its step; ``None`` (nothing loaded) when there is none yet.

    ``optimizer`` is freshly built, in any mode; the base optimizer's state of parameters that
    are not LoRA factors is created first (:func:`~lowrank_opt.distributed.init_base_state`), so
    the strict load finds an entry for each. Every rank must call it.
    """
    from . import init_base_state

    found = latest(root)
    if found is None:
        return None
    directory, step = found
    init_base_state(optimizer)
    state = _state(model, optimizer, extra)
    dcp.load(state, checkpoint_id=directory, no_dist=not _distributed())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    if extra is not None:
        for key in extra:
            extra[key] = state[key]
    return step
