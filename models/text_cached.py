"""Top layers trained over cached lower-layer states (``FineTuneConfig.cache_lower``).

With LoRA adapters on the top N layers only (``lora_layers``), the embeddings and the bottom L - N
layers are frozen. Their output for each training input is computed once, in eval mode without
gradients, and kept (:class:`StateStore`: float16 for training inputs, float32 for dev, in memory or
in a memory-mapped file when large); every epoch then runs only the top N layers (with their
adapters, dropout on) and the head from those states: about N / L of the forward and backward.

Deviation from the uncached fine-tune, on purpose: the frozen layers run in eval mode, so their
dropout is off during training (the uncached run draws dropout masks in every layer); the top layers
keep theirs. Dev predictions from the cache equal the full model's (eval mode, float32 states).

Conversation mode: a token's lower-layer states depend on its chunk (the turns before it and its
position), and the uncached training draws a new chunk alignment per conversation and epoch. Here
``cache_alignments`` (k) alignments are cached, offsets spread evenly over the chunk (0, chunk / k,
...), and each epoch draws one of them per conversation. Caching costs about (L - N) / L of an
inference pass per alignment, so k must stay below the number of epochs to pay; k = 2 (each turn
seen at two chunk positions, i.e. with two amounts of past) is the default.

Works for BERT-family encoders (MiniLM) and MPNet (whose relative position bias is computed from the
sequence length and passed to every layer); both prepare the attention mask with
``transformers.masking_utils.create_bidirectional_mask`` (a prepared 4-D turn mask passes unchanged).

Pure PyTorch + transformers/peft: never imports ``service/``.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.text_chunks import Chunk, chunk_batches, pad_chunks, pool_chunks, split_outputs, training_chunks
from models.text_finetune import (
    Batch,
    FineTuneConfig,
    Forward,
    TextClassifier,
    _batches,
    _ChunkTask,
    _length_batches,
    _PairTask,
    pad_batch,
    tokenize_all,
)

__all__ = ["StateStore", "cached_task", "layer_split", "lower_states", "run_layers"]


def _memory_budget() -> int:
    """``MERC_LOWER_CACHE_MB`` (default 3072): a larger cache goes to a memory-mapped file."""
    return int(float(os.environ.get("MERC_LOWER_CACHE_MB", "3072")) * 2**20)


# ---------------------------------------------------------------- the layer split and the two halves


def base_model(encoder: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers injected in place), or ``encoder``."""
    get = getattr(encoder, "get_base_model", None)
    return get() if callable(get) else encoder


def layer_split(model: TextClassifier, cfg: FineTuneConfig) -> tuple[nn.Module, int]:
    """``(the transformers model, index of the first trained layer)``: ``num_hidden_layers - lora_layers``.

    Raises ValueError unless every trainable encoder parameter lies in the top layers (LoRA on the top
    ``lora_layers`` layers; a warm start whose adapter covers lower layers is refused)."""
    if cfg.adapter != "lora" or cfg.lora_layers is None:
        raise ValueError("cache_lower needs LoRA adapters on the top layers only (--lora-layers N)")
    base = base_model(model.encoder)
    n = int(base.config.num_hidden_layers)
    start = max(0, n - cfg.lora_layers)
    lower = {f"layer.{i}." for i in range(start)}
    for name, p in model.encoder.named_parameters():
        if p.requires_grad and ("embeddings" in name or any(key in name for key in lower)):
            raise ValueError(f"cache_lower: {name} is trained but lies below layer {start} (its states are cached)")
    return base, start


def run_layers(base: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: range) -> torch.Tensor:
    """Run ``base``'s transformer layers ``layers`` over ``hidden`` (B, T, H) -> (B, T, H).

    ``attention_mask``: what the model's forward takes: (B, T) padding mask, or a prepared (B, 1, T, T)
    mask (:meth:`TextClassifier.chunk_mask`). MPNet layers also get the relative position bias
    (B, heads, T, T), computed from T as ``MPNetEncoder.forward`` does."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask)
    stack = base.encoder
    extra = (stack.compute_position_bias(hidden),) if hasattr(stack, "compute_position_bias") else ()
    for i in layers:
        out = stack.layer[i](hidden, mask, *extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def lower_states(base: nn.Module, inputs: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """The hidden states entering layer ``start`` (B, T, H): embeddings of ``input_ids`` (B, T) (and
    ``token_type_ids``), then layers ``0..start-1`` under ``attention_mask`` (as :func:`run_layers`)."""
    kw = {k: inputs[k] for k in ("input_ids", "token_type_ids") if k in inputs}
    hidden = base.embeddings(**kw)
    return run_layers(base, hidden, inputs["attention_mask"], range(start))


def top_hidden(model: TextClassifier, start: int, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states (B, T, H) float32 from the cached ``states`` (B, T, H) entering layer ``start``."""
    base = base_model(model.encoder)
    n = int(base.config.num_hidden_layers)
    return run_layers(base, states, attention_mask, range(start, n)).float()


# ---------------------------------------------------------------- the cache


def _marked(part: Path) -> int:
    """The groups a ``.part`` file says are stored (0 if it is unreadable)."""
    try:
        return max(0, int(part.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 0


class StateStore:
    """Lower-layer states of many inputs, (T_i, H) each, in one (sum of T_i, H) array: in memory, or a
    memory-mapped ``.npy`` file in ``directory`` (removed with the store), or the file ``keep`` that
    outlives the process: a resumed run reuses it (``ready`` once :meth:`finish` marked it complete) or
    continues filling it after the ``filled`` groups of inputs an interrupted process recorded (:meth:`mark`)."""

    def __init__(
        self, lengths: Sequence[int], hidden: int, dtype: Any, directory: str | None = None, keep: Path | None = None
    ) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        shape = (int(self.offsets[-1]), hidden)
        self._tmp, self.keep, self.ready, self.filled = None, keep, False, 0
        nbytes = shape[0] * hidden * np.dtype(dtype).itemsize
        if keep is not None:
            self._open(keep, shape, np.dtype(dtype))
        elif nbytes > _memory_budget():
            self._tmp = tempfile.TemporaryDirectory(prefix="merc-lower-", dir=directory)
            self.path: Path | None = Path(self._tmp.name) / "states.npy"
            self.data = np.lib.format.open_memmap(self.path, "w+", dtype, shape)
        else:
            self.path, self.data = None, np.empty(shape, dtype)

    def _open(self, keep: Path, shape: tuple[int, int], dtype: np.dtype) -> None:
        """Open the ``keep`` file: complete (read-only), partly filled (``filled`` groups) or new."""
        keep.parent.mkdir(parents=True, exist_ok=True)
        done, part = keep.with_suffix(".done"), keep.with_suffix(".part")
        self.path = keep
        if keep.is_file() and (done.is_file() or part.is_file()):
            data = np.lib.format.open_memmap(keep, "r" if done.is_file() else "r+")
            if data.shape == shape and data.dtype == dtype:
                self.data, self.ready = data, done.is_file()
                self.filled = 0 if self.ready else _marked(part)
                return
            del data
        done.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        self.data = np.lib.format.open_memmap(keep, "w+", dtype, shape)

    def mark(self, groups: int) -> None:
        """Record that the first ``groups`` groups of inputs are stored (a ``keep`` file continues there)."""
        if self.keep is not None:
            self.data.flush()
            part = self.keep.with_suffix(".part")
            part.with_suffix(".tmp").write_text(f"{groups}\n")
            os.replace(part.with_suffix(".tmp"), part)  # a process killed meanwhile leaves the old mark
            self.filled = groups

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def put(self, i: int, rows: np.ndarray) -> None:
        """Store input ``i``'s states (T_i, H)."""
        self.data[self.offsets[i] : self.offsets[i + 1]] = rows

    def padded(self, idx: Sequence[int], width: int) -> torch.Tensor:
        """The states of inputs ``idx``, zero-padded on the right: (len(idx), width, H) float32."""
        out = np.zeros((len(idx), width, self.data.shape[1]), np.float32)
        for b, i in enumerate(idx):
            a, e = self.offsets[i], self.offsets[i + 1]
            out[b, : e - a] = self.data[a:e]
        return torch.from_numpy(out)

    def finish(self) -> None:
        """Mark a ``keep`` file complete (a later process reuses it)."""
        if self.keep is not None and not self.ready:
            self.data.flush()
            self.keep.with_suffix(".done").write_text("complete\n")
            self.keep.with_suffix(".part").unlink(missing_ok=True)
            self.ready = True

    def release(self) -> None:
        """Remove a ``keep`` file (the run it served has ended)."""
        if self.keep is not None:
            del self.data
            for suffix in (".done", ".part", ".tmp", ".npy"):
                self.keep.with_suffix(suffix).unlink(missing_ok=True)
            self.keep = None

    def describe(self) -> str:
        where = f"memory-mapped {self.path}" if self.path else "in memory"
        return f"{self.nbytes / 2**20:.1f} MB {self.data.dtype} ({self.data.shape[0]} tokens, {where})"


def fill_store(
    store: StateStore,
    groups: Sequence[Sequence[int]],
    make_batch: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    lengths: Sequence[int],
    base: nn.Module,
    start: int,
    desc: str,
) -> None:
    """Compute every input's states (``make_batch(group)``: the model inputs of those inputs, on the
    model's device; :func:`lower_states`) group by group, keeping each input's first ``lengths[i]`` rows;
    groups an earlier process stored (``store.filled``) are skipped, progress is marked every minute."""
    from tqdm import tqdm

    marked = time.perf_counter()
    rest = tqdm(
        groups[store.filled :], desc=desc, unit="batch", mininterval=30.0, initial=store.filled, total=len(groups)
    )
    for k, group in enumerate(rest, start=store.filled):
        states = lower_states(base, make_batch(group), start).float().cpu().numpy()
        for b, i in enumerate(group):
            store.put(i, states[b, : lengths[i]])
        if time.perf_counter() - marked > 60.0:
            store.mark(k + 1)
            marked = time.perf_counter()


class _Cache:
    """What both cached tasks share: the split model, where the stores go, progress."""

    group_tokens = 4096  # padded tokens per batch while the states are computed

    def _setup(
        self, model: TextClassifier, cfg: FineTuneConfig, device: str, progress: Any, keep: str | Path | None
    ) -> None:
        self.model_ref = model.to(device)
        self.base, self.start = layer_split(model, cfg)
        self.device, self.progress = device, progress
        self.directory = os.environ.get("MERC_LOWER_CACHE_DIR") or None
        self.keep_dir = Path(keep) if keep is not None else None
        self.stores: list[StateStore] = []

    def _key(self, inputs: Any, dtype: Any) -> str:
        """sha256 of what the states depend on: the frozen weights below the split, the inputs, the dtype."""
        h = hashlib.sha256(f"{self.start}|{np.dtype(dtype).str}|{inputs!r}".encode())
        n = int(self.base.config.num_hidden_layers)
        top = tuple(f"layer.{i}." for i in range(self.start, n))
        for name, t in sorted(self.base.state_dict().items()):
            if "lora_" not in name and not any(k in name for k in top):
                h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def release(self) -> None:
        """Remove the stores' files kept for a resumed run (training has ended)."""
        for store in self.stores:
            store.release()
        if self.keep_dir is not None and self.keep_dir.is_dir() and not any(self.keep_dir.iterdir()):
            self.keep_dir.rmdir()

    def _build(
        self,
        lengths: Sequence[int],
        groups: Sequence[Sequence[int]],
        make_batch: Callable[[Sequence[int]], dict[str, torch.Tensor]],
        dtype: Any,
        name: str,
        inputs: Any,
    ) -> StateStore:
        """A filled :class:`StateStore` (the model in eval mode meanwhile); reports size and time. With a
        ``keep_dir`` (the checkpoint folder) the states go to a file there, reused by a resumed run when
        ``inputs`` (what identifies them, with the frozen weights) are the same."""
        started, cpu, was_training = time.perf_counter(), time.process_time(), self.model_ref.training
        keep = self.keep_dir / f"lower-{name}-{self._key(inputs, dtype)[:16]}.npy" if self.keep_dir else None
        store = StateStore(lengths, int(self.base.config.hidden_size), dtype, self.directory, keep)
        self.stores.append(store)
        reused = store.ready
        if not reused:
            self.model_ref.eval()
            fill_store(store, groups, make_batch, lengths, self.base, self.start, f"cache {name} (< {self.start})")
            self.model_ref.train(was_training)
            store.finish()
        if self.progress:
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            how = "reused (computed by an earlier process)" if reused else f"{wall:.1f} s ({cpu:.1f} s of CPU)"
            self.progress(f"cache_lower {name}: {store.describe()}, {how}")
        return store


# ---------------------------------------------------------------- pair mode


class CachedPairTask(_PairTask, _Cache):
    """:class:`models.text_finetune._PairTask` over cached lower-layer states.

    Each input is tokenized once over the whole split (:func:`models.text_finetune.tokenize_all`, as
    serving does), so a batch made only of inputs without context keeps the pair form ``[CLS] a [SEP]
    [SEP]`` (the uncached training tokenizes per batch). Batches are drawn as the uncached task's."""

    def __init__(
        self,
        model: TextClassifier,
        tokenizer: Any,
        train: Any,
        dev: Any,
        cfg: FineTuneConfig,
        device: str,
        progress: Any,
        keep: str | Path | None = None,
    ) -> None:
        super().__init__(tokenizer, train, dev, cfg)
        self._setup(model, cfg, device, progress, keep)
        self.pad_id = tokenizer.pad_token_id or 0
        if getattr(tokenizer, "padding_side", "right") == "left":
            raise ValueError("cache_lower: left-padding tokenizers are not supported")
        self.items = tokenize_all(tokenizer, self.x_train, cfg.window.max_length)
        self.dev_items = tokenize_all(tokenizer, self.x_dev, cfg.window.max_length)
        self.store = self._store(self.items, np.float16, "train")
        self.dev_store = self._store(self.dev_items, np.float32, "dev")

    def _store(self, items: list[dict[str, list[int]]], dtype: Any, name: str) -> StateStore:
        lengths = [len(it["input_ids"]) for it in items]
        order = sorted(range(len(items)), key=lambda i: lengths[i])
        groups = _length_batches(order, lengths, 64, 0.25)

        def make(group: Sequence[int]) -> dict[str, torch.Tensor]:
            return {k: v.to(self.device) for k, v in pad_batch([items[i] for i in group], self.pad_id).items()}

        inputs = [(it["input_ids"], it.get("token_type_ids")) for it in items]
        return self._build(lengths, groups, make, dtype, name, inputs)

    def forward_cached(
        self, model: TextClassifier, store: StateStore, items: Sequence[dict[str, list[int]]], idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (B, H), logits (B, C))`` of inputs ``idx`` from their cached states."""
        batch = {k: v.to(self.device) for k, v in pad_batch([items[i] for i in idx], self.pad_id).items()}
        states = store.padded(idx, batch["input_ids"].shape[1]).to(self.device)
        hidden = top_hidden(model, self.start, states, batch["attention_mask"])
        pooled = model.pool_hidden(hidden, batch)
        return pooled, model.head(model.dropout(pooled))

    def epoch(self, rng: random.Random) -> list[Batch]:
        def run(idx: list[int]) -> Forward:
            return lambda model, device: self.forward_cached(model, self.store, self.items, idx)

        batches = _batches(len(self.x_train), self.lengths, self.cfg.batch_size, rng)
        return [(run(idx), [self.y_train[i] for i in idx], None) for idx in batches]

    @torch.no_grad()
    def dev_predict(self, model: TextClassifier, device: str, amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dev labels (N,), probabilities (N, C) and pooled vectors (N, H), from the float32 dev cache."""
        model.eval()
        lengths = [len(it["input_ids"]) for it in self.dev_items]
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        pooled = np.zeros((len(lengths), model.head.in_features), np.float32)
        probs = np.zeros((len(lengths), model.head.out_features), np.float32)
        for idx in _length_batches(order, lengths, 64, None):
            vec, logits = self.forward_cached(model, self.dev_store, self.dev_items, idx)
            pooled[idx], probs[idx] = vec.cpu().numpy(), torch.softmax(logits.float(), -1).cpu().numpy()
        return np.array(self.y_dev), probs, pooled


# ---------------------------------------------------------------- conversation mode


class _Offset:
    """A stand-in for ``random.Random`` in :func:`models.text_chunks.training_chunks`: one fixed alignment."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def randrange(self, n: int) -> int:
        return self.offset


def alignment_offsets(chunk: int, k: int) -> list[int]:
    """``k`` chunk alignments spread evenly over ``chunk`` (1 <= k <= chunk): 0, chunk / k, ..."""
    k = max(1, min(k, chunk))
    return sorted({a * chunk // k for a in range(k)})


class CachedChunkTask(_ChunkTask, _Cache):
    """:class:`models.text_finetune._ChunkTask` over cached lower-layer states of ``cfg.cache_alignments``
    fixed chunk alignments (:func:`alignment_offsets`); each epoch draws one per conversation. Dev uses
    alignment 0, as uncached (float32 states: its predictions equal the full model's)."""

    def __init__(
        self,
        model: TextClassifier,
        tokenizer: Any,
        train: Any,
        dev: Any,
        cfg: FineTuneConfig,
        targets: Any,
        device: str,
        progress: Any,
        keep: str | Path | None = None,
    ) -> None:
        super().__init__(tokenizer, train, dev, cfg, targets)
        self._setup(model, cfg, device, progress, keep)
        w = cfg.window
        self.offsets = alignment_offsets(w.chunk, cfg.cache_alignments)
        # per alignment, per conversation: indices into self.chunks
        self.table: list[list[list[int]]] = []
        self.chunks: list[Chunk] = []
        self.ys: list[list[int]] = []
        self.rows: list[np.ndarray] = []
        for offset in self.offsets:
            per_conv = []
            for c, (toks, lab) in enumerate(zip(*self.train, strict=True)):
                part, y = training_chunks([toks], [lab], self.cls_id, self.sep_id, w.past, w.chunk, _Offset(offset))
                per_conv.append(list(range(len(self.chunks), len(self.chunks) + len(part))))
                self.chunks += part
                self.ys += y
                if self.t_train is not None:
                    self.rows += [self.t_train[c][[i for i, _ in ch.outputs]] for ch in part]
            self.table.append(per_conv)
        if progress:
            progress(f"cache_lower: {len(self.offsets)} chunk alignments (offsets {self.offsets}) of chunk {w.chunk}")
        self.store = self._store(self.chunks, np.float16, "train")
        self.dev_chunks, self.dev_ys, _ = self._chunks(self.dev, None)
        self.dev_store = self._store(self.dev_chunks, np.float32, "dev")

    def _store(self, chunks: Sequence[Chunk], dtype: Any, name: str) -> StateStore:
        lengths = [len(c.input_ids) for c in chunks]
        groups = chunk_batches(chunks, self.group_tokens, 0.25)

        def make(group: Sequence[int]) -> dict[str, torch.Tensor]:
            batch = pad_chunks([chunks[i] for i in group], self.pad_id, self.cfg.window.reach)
            mask = self.model_ref.chunk_mask(batch["attention_mask"])
            return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": mask.to(self.device)}

        inputs = ([(c.input_ids, c.turn_ids) for c in chunks], self.cfg.window.reach)
        return self._build(lengths, groups, make, dtype, name, inputs)

    def forward_cached(
        self, model: TextClassifier, store: StateStore, chunks: Sequence[Chunk], idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (N, H), logits (N, C))`` over the outputs of chunks ``idx``, in order, from their states."""
        part = [chunks[i] for i in idx]
        batch = {k: v.to(self.device) for k, v in pad_chunks(part, self.pad_id, self.cfg.window.reach).items()}
        states = store.padded(idx, batch["input_ids"].shape[1]).to(self.device)
        hidden = top_hidden(model, self.start, states, model.chunk_mask(batch["attention_mask"]))
        pooled = pool_chunks(hidden, batch, part)
        return pooled, model.head(model.dropout(pooled))

    def epoch(self, rng: random.Random) -> list[Batch]:
        ids = [i for conv in zip(*self.table, strict=True) for i in conv[rng.randrange(len(self.offsets))]]

        def run(part: list[int]) -> Forward:
            return lambda model, device: self.forward_cached(model, self.store, self.chunks, part)

        lengths = [len(self.chunks[i].input_ids) for i in ids]
        batches = [[ids[j] for j in idx] for idx in _batches(len(ids), lengths, self.per_batch, rng)]
        return [
            (
                run(idx),
                [y for i in idx for y in self.ys[i]],
                np.concatenate([self.rows[i] for i in idx]) if self.rows else None,
            )
            for idx in batches
        ]

    @torch.no_grad()
    def dev_predict(self, model: TextClassifier, device: str, amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dev labels (N,), probabilities (N, C) and pooled vectors (N, H) in chunk order, from the dev cache."""
        model.eval()
        pooled: list[np.ndarray] = [np.zeros((0, model.head.in_features), np.float32)] * len(self.dev_chunks)
        probs: list[np.ndarray] = [np.zeros((0, model.head.out_features), np.float32)] * len(self.dev_chunks)
        for idx in chunk_batches(self.dev_chunks, 4096, 0.25):
            vec, logits = self.forward_cached(model, self.dev_store, self.dev_chunks, idx)
            part = [self.dev_chunks[i] for i in idx]
            p = torch.softmax(logits.float(), -1).cpu().numpy()
            for i, v, q in zip(idx, split_outputs(vec.cpu().numpy(), part), split_outputs(p, part), strict=True):
                pooled[i], probs[i] = v, q
        ys = np.array([y for row in self.dev_ys for y in row])
        return ys, np.concatenate(probs), np.concatenate(pooled)


def cached_task(
    model: TextClassifier,
    tokenizer: Any,
    train: Any,
    dev: Any,
    cfg: FineTuneConfig,
    targets: Any,
    device: str,
    progress: Callable[[str], None] | None,
    keep: str | Path | None = None,
) -> CachedPairTask | CachedChunkTask:
    """The training task of ``cfg.window.mode`` over cached lower-layer states (what
    :func:`models.text_finetune.finetune_text_encoder` uses when ``cfg.cache_lower``). ``keep``: a folder
    (the checkpoint's) where the states stay on disk for a resumed run, until ``task.release()``."""
    if cfg.window.mode == "conversation":
        return CachedChunkTask(model, tokenizer, train, dev, cfg, targets, device, progress, keep)
    return CachedPairTask(model, tokenizer, train, dev, cfg, device, progress, keep)
