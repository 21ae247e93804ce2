"""Resumable text fine-tuning: the checkpoint of a run of :func:`models.text_finetune.finetune_text_encoder`.

A checkpoint is ``DIR/checkpoint.pt`` (``torch.save``; written under a temporary name, synced, then
renamed, so a kill leaves the previous one whole) and ``DIR/checkpoint.json`` (a readable summary). It
holds what an uninterrupted run still has in memory at an optimiser-step boundary:

- the trainable weights only (LoRA adapter + head; the whole encoder with ``adapter="full"``), the
  best ones so far, the optimiser moments (of those weights), scheduler and GradScaler states;
- the position: epoch, next batch inside it, step, and the batch-order ``random.Random`` state *at
  the epoch's start* (the epoch's batch list is recomputed from it, then the first batches skipped);
- the torch (CPU and CUDA), numpy and global ``random`` states at the boundary, so dropout draws the
  same masks after a resume;
- patience counter, best score, the history so far and the training seconds spent;
- an identity: the config, labels, head size, a fingerprint of the initial model and a hash of the
  train/dev inputs (and distillation targets). A resume whose identity differs is refused.

Pure PyTorch: never imports ``service/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Checkpointing", "TrainState", "TrainingStopped", "discard", "read_summary"]

FORMAT = 1
FILE, SUMMARY = "checkpoint.pt", "checkpoint.json"


@dataclass
class Checkpointing:
    """Where and when a fine-tune writes checkpoints, and whether it continues one.

    Attributes:
        directory: the checkpoint folder (created on the first write).
        every: seconds between checkpoints (0: after every optimiser step); one is also written after
            every dev evaluation (each epoch end included) and when training ends.
        resume: continue from the checkpoint in ``directory`` (refused if its identity differs);
            False refuses to start a fresh run over an existing checkpoint.
        stop_after: seconds of training in this process; then a checkpoint and :class:`TrainingStopped`.
        stop_at_step: checkpoint and raise :class:`TrainingStopped` once this optimiser step is done.
        note: extra fields for ``checkpoint.json`` (e.g. the command that resumes the run).
    """

    directory: Path
    every: float = 300.0
    resume: bool = False
    stop_after: float | None = None
    stop_at_step: int | None = None
    note: dict[str, Any] = field(default_factory=dict)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (``stop_after`` / ``stop_at_step``) after writing a checkpoint."""

    def __init__(self, directory: Path, epoch: int, next_batch: int, step: int) -> None:
        super().__init__(
            f"stopped at epoch {epoch + 1}, batch {next_batch}, step {step}; checkpoint in {directory} (resume it)"
        )
        self.directory, self.epoch, self.next_batch, self.step = directory, epoch, next_batch, step


@dataclass
class TrainState:
    """Where a fine-tune is, and what it has kept (everything but the model and the optimiser)."""

    epoch: int = 0  # 0-based epoch in progress
    next_batch: int = 0  # first batch of that epoch not trained yet
    epoch_rng: Any = None  # the batch-order random.Random state at that epoch's start
    step: int = 0
    best: float = -math.inf
    best_state: dict[str, torch.Tensor] | None = None  # trainable weights at the best evaluation (CPU)
    bad: int = 0  # evaluations since the best
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # training seconds of earlier processes (a resumed run)
    finished: bool = False  # early-stopped or out of steps: nothing left to train


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies (CPU) of the parameters that train: LoRA + head, or every weight of a full fine-tune."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`trainable_state` values into ``model``'s parameters (the names must be the trainable ones)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params))[:3], sorted(set(params) - set(state))[:3]
        raise ValueError(f"checkpoint weights do not fit the model (unexpected {extra}, missing {missing})")
    for name, value in state.items():
        params[name].copy_(value)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape and first 16 values (CPU, float32): tells base models
    (and warm starts) apart without hashing hundreds of MB; computed before any training step."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        head = p.detach().reshape(-1)[:16].to("cpu", torch.float32).numpy()
        h.update(f"{name}{tuple(p.shape)}".encode() + head.tobytes())
    return h.hexdigest()


def data_hash(train: Any, dev: Any, targets: Sequence[Sequence[np.ndarray]] | None) -> str:
    """sha256 of the train and dev inputs and labels (JSON) and the distillation targets' bytes."""
    h = hashlib.sha256(json.dumps([train, dev], default=list).encode())
    for split in targets or ():
        for rows in split:
            h.update(np.ascontiguousarray(rows, np.float32).tobytes())
    return h.hexdigest()


def _rng_states(device: str) -> dict[str, Any]:
    """Global RNG states (torch CPU and CUDA, numpy, random) as plain, ``weights_only``-loadable values."""
    kind, keys, pos, gauss, cached = np.random.get_state()  # type: ignore[misc]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, [int(k) for k in keys], int(pos), int(gauss), float(cached)),
        "python": random.getstate(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rngs(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), pos, gauss, cached))
    random.setstate(_tuples(states["python"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples where a round trip may have made lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def read_summary(directory: str | Path) -> dict[str, Any] | None:
    """``checkpoint.json`` of ``directory``, or None where there is no checkpoint."""
    path = Path(directory) / SUMMARY
    return json.loads(path.read_text()) if (Path(directory) / FILE).is_file() and path.is_file() else None


def discard(directory: str | Path) -> None:
    """Remove a checkpoint's files (and ``directory`` itself where that leaves it empty)."""
    directory = Path(directory)
    for name in (FILE, SUMMARY, FILE + ".tmp", SUMMARY + ".tmp"):
        (directory / name).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Readable differences of two identities (config fields named one by one)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            flat_a, flat_b = _flat(a), _flat(b)
            out += [
                f"{k} {flat_a.get(k)!r} -> {flat_b.get(k)!r}"
                for k in sorted(set(flat_a) | set(flat_b))
                if flat_a.get(k) != flat_b.get(k)
            ]
        elif a != b:
            out.append({"data": "the train/dev data", "model": "the base model"}.get(key, key) + " differs")
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class CheckpointWriter:
    """Writes and restores the checkpoints of one fine-tune (:class:`Checkpointing` decides when)."""

    def __init__(self, policy: Checkpointing, identity: dict[str, Any], progress: Callable[[str], None] | None):
        self.policy, self.identity, self.progress = policy, identity, progress
        self.directory = Path(policy.directory)
        existing = read_summary(self.directory)
        if existing is not None and not policy.resume:
            raise ValueError(
                f"{self.directory} already holds a checkpoint (epoch {existing['epoch']}, step {existing['step']}): "
                "continue it with --resume, or delete it for a fresh run"
            )
        if existing is None and policy.resume:
            raise ValueError(f"--resume {self.directory}: no checkpoint there ({FILE})")

    def _say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    def save(
        self, state: TrainState, elapsed: float, model: nn.Module, optim: Any, sched: Any, scaler: Any, device: str
    ) -> None:
        """Write the checkpoint of ``state`` (at an optimiser-step boundary) atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        position = {
            "epoch": state.epoch,
            "next_batch": state.next_batch,
            "step": state.step,
            "finished": state.finished,
        }
        trainable = trainable_state(model)
        best_is_current = state.best_state is not None and all(
            torch.equal(v, trainable[k]) for k, v in state.best_state.items()
        )  # right after an improving evaluation (often): one copy, a quarter of the file saved
        payload = {
            "format": FORMAT,
            "identity": self.identity,
            "position": position,
            "epoch_rng": state.epoch_rng,
            "trainable": trainable,
            "optimizer": optim.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_states(device),
            "best": state.best,
            "best_state": None if best_is_current else state.best_state,
            "best_is_current": best_is_current,
            "bad": state.bad,
            "history": state.history,
            "elapsed": elapsed,
            "device": device,
        }
        _write_atomic(self.directory / FILE, lambda f: torch.save(payload, f))
        size = (self.directory / FILE).stat().st_size
        summary = {
            **position,
            "seconds": round(elapsed, 1),
            "bytes": size,
            "device": device,
            "history": state.history,
            **self.policy.note,
        }
        _write_atomic(self.directory / SUMMARY, lambda f: f.write(json.dumps(summary, indent=2).encode()))
        self._say(
            f"checkpoint: epoch {state.epoch + 1} batch {state.next_batch} step {state.step}"
            f"{' (finished)' if state.finished else ''} -> {self.directory} ({size / 1e6:.1f} MB)"
        )

    def restore(self, model: nn.Module, optim: Any, sched: Any, scaler: Any, device: str) -> TrainState:
        """Load the checkpoint into the model, optimiser, scheduler, scaler and global RNGs; its TrainState."""
        payload = torch.load(self.directory / FILE, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"{self.directory}: checkpoint format {payload.get('format')}, this code reads {FORMAT}")
        diff = _differences(payload["identity"], self.identity)
        if diff:
            raise ValueError(
                f"--resume {self.directory}: the checkpoint belongs to a different run ({'; '.join(diff)}); "
                "resume with the same options and data, or start afresh in another --checkpoint-dir"
            )
        load_trainable(model, payload["trainable"])
        optim.load_state_dict(payload["optimizer"])
        sched.load_state_dict(payload["scheduler"])
        if payload["scaler"] and scaler.is_enabled():  # a CPU (disabled) scaler saves {}: nothing to restore
            scaler.load_state_dict(payload["scaler"])
        _restore_rngs(payload["rng"])
        pos = payload["position"]
        state = TrainState(
            epoch=pos["epoch"],
            next_batch=pos["next_batch"],
            epoch_rng=_tuples(payload["epoch_rng"]),
            step=pos["step"],
            best=payload["best"],
            best_state=payload["trainable"] if payload["best_is_current"] else payload["best_state"],
            bad=payload["bad"],
            history=payload["history"],
            elapsed=payload["elapsed"],
            finished=pos["finished"],
        )
        self._say(
            f"resume: epoch {state.epoch + 1} batch {state.next_batch} step {state.step} from {self.directory} "
            f"(written on {payload['device']}, {state.elapsed:.0f} s trained, {len(state.history)} evaluations)"
        )
        return state
