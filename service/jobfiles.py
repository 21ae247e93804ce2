"""A job's files on the data volume (torch-free, so the API and the job runner can use them).

``jobs/<id>/request.json`` holds the request, ``features.npz`` one (n, D) float32 array and
a presence mask per modality; both are replaced atomically (write a sibling, rename).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

FeatureLists = dict[str, list[np.ndarray | None]]


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, atomically (FileNotFoundError if the folder is gone)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(value, allow_nan=False))
    tmp.replace(path)


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
    tmp = path.with_name(f"features.{uuid.uuid4().hex}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_features(path: Path) -> FeatureLists:
    """What ``save_features`` wrote: modality -> one (D,) vector or None per utterance."""
    with np.load(path) as data:
        names = [k for k in data.files if not k.endswith("__present")]
        return {m: [row if ok else None for row, ok in zip(data[m], data[f"{m}__present"], strict=True)] for m in names}
