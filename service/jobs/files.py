"""A job's files on the data volume (torch-free, so the API and the job runner can use them).

``jobs/<id>/request.json`` holds the request, ``features.npz`` one (n, D) float32 array and
a presence mask per modality; both are replaced atomically (write a sibling, rename).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FeatureLists = dict[str, list[np.ndarray | None]]


def atomic_write(path: Path, write: Callable[[Path], Any], suffix: str = ".tmp") -> None:
    """The one atomic-write helper: ``write(tmp)`` a sibling temporary file, then rename it onto
    ``path`` (readers see the old or the new file, never half of one). FileNotFoundError if the
    folder is gone (a deleted job); the temporary file never outlives a failed write."""
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}{suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, atomically (FileNotFoundError if the folder is gone)."""
    text = json.dumps(value, allow_nan=False)  # ValueError for NaN before anything is written
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_features(path: Path, features: FeatureLists, n: int) -> None:
    """modality -> (n, D) float32 plus a presence mask, in one npz (atomically replaced)."""
    arrays = {}
    for m, vectors in features.items():
        dim = next((len(v) for v in vectors if v is not None), 0)
        arr = np.zeros((n, dim), dtype=np.float32)
        present = np.zeros(n, dtype=bool)
        for i, v in enumerate(vectors[:n]):
            if v is not None:
                arr[i], present[i] = v, True
        arrays[m], arrays[f"{m}__present"] = arr, present
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".tmp.npz")


def load_features(path: Path) -> FeatureLists:
    """What ``save_features`` wrote: modality -> one (D,) vector or None per utterance."""
    with np.load(path) as data:
        names = [k for k in data.files if not k.endswith("__present")]
        return {m: [row if ok else None for row, ok in zip(data[m], data[f"{m}__present"], strict=True)] for m in names}
