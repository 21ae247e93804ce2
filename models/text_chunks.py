"""One pass over a conversation: turns encoded in chunks under a turn-causal attention mask.

The pair encoding (:func:`models.text_finetune.window_pairs`) feeds every utterance its own copy of
its context, so a conversation costs about (1 + past) times its tokens. ``mode="conversation"``
encodes each turn's tokens once. The present turns are cut into chunks of ``chunk`` output turns;
each chunk's input also carries the ``past`` turns before it (their outputs belong to the previous
chunk)::

    [CLS] t_{s} [SEP] t_{s+1} [SEP] ... t_{b-1} [SEP]      s = max(0, a - past), chunk = turns [a, b)

A token of turn i attends to every token of turns s..i (and [CLS]); never to a later turn. So a
turn's vector depends only on the turns before it (a chat and a whole conversation give the same
vectors, and appending a turn never changes an earlier one), every turn sees at least ``past``
previous turns, up to ``past + chunk - 1``, and a conversation costs about (1 + past / chunk) times
its tokens: 1.5x for past 2, chunk 4, against 3x for pairs. Pooling: the mean over the turn's own
tokens ([SEP] excluded) of the last layer.

``ContextWindow.windowed`` narrows the mask further: a token attends to its own turn and the ``past``
turns before it only (and [CLS]), the view the pair encoder gives its target, at every chunk position
(earlier turns still reach it indirectly, through the layers). The default text encoder is such a
model distilled from the pair encoder (``merc finetune-text --distill``, docs/results.md).

Deviation from the pair encoder, on purpose: context tokens do not attend to the target (they are
encoded once for every target that reads them). The model must therefore be fine-tuned in this mode;
training uses the same chunks with a random chunk alignment per conversation and epoch (every turn
is seen at every chunk position).

Appends: since a chunk's earlier tokens never attend to a later turn, their per-layer keys and values
stay valid when a turn joins the chunk; :func:`forward_kv` runs the BERT layers over the new turn's
tokens only, after those keys and values (:func:`extend_chunks`, several chunks in one batch), with
the vectors of a full pass.

Pure PyTorch + transformers: never imports ``service/``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Chunk", "chunk_conversation", "chunk_key", "pad_chunks", "pool_chunks", "predict_chunks"]

PAD_TURN = 1_000_000  # turn id of padding tokens: no real token attends to them


@dataclass
class Chunk:
    """One encoder input: token ids, the local turn id of each token (-1 = [CLS]), and its outputs.

    ``outputs`` are ``(position in the conversation's present turns, local turn id)`` of the turns whose
    vectors this chunk yields; ``start`` is the first input turn's position (the cache key begins there).
    """

    input_ids: list[int]
    turn_ids: list[int]
    pool: list[int]  # 1 on a token that is pooled (a turn's own tokens, not [SEP]/[CLS])
    outputs: list[tuple[int, int]]
    start: int


def chunk_bounds(n: int, chunk: int, offset: int = 0) -> list[tuple[int, int]]:
    """Output ranges ``[a, b)`` over ``n`` turns: the first ``offset`` turns (if > 0), then every ``chunk``."""
    bounds, a = [], 0
    first = offset if 0 < offset < chunk else chunk
    while a < n:
        b = min(n, a + (first if a == 0 else chunk))
        bounds.append((a, b))
        a = b
    return bounds


def input_start(index: int, chunk: int, past: int) -> int:
    """First input turn of the chunk (alignment 0) that yields turn ``index``."""
    return max(0, (index // chunk) * chunk - past)


def chunk_conversation(
    tokens: Sequence[Sequence[int]],
    cls_id: int,
    sep_id: int,
    past: int,
    chunk: int,
    offset: int = 0,
    need: Sequence[bool] | None = None,
) -> list[Chunk]:
    """The chunks of one conversation's present turns (``tokens[i]``: turn i's ids, no specials).

    ``need[i]`` False: turn i's vector is not wanted (an append's earlier turns, a cached vector);
    chunks without any wanted turn are skipped, and a chunk's input stops after its last wanted turn
    (later turns cannot change it)."""
    out = []
    for a, b in chunk_bounds(len(tokens), chunk, offset):
        wanted = [i for i in range(a, b) if need is None or need[i]]
        if not wanted:
            continue
        s, end = max(0, a - past), wanted[-1] + 1
        ids, turn_ids, pool = [cls_id], [-1], [0]
        for i in range(s, end):
            ids += [*tokens[i], sep_id]
            turn_ids += [i - s] * (len(tokens[i]) + 1)
            pool += [1] * len(tokens[i]) + [0 if tokens[i] else 1]  # an empty turn pools its [SEP]
        out.append(Chunk(ids, turn_ids, pool, [(i, i - s) for i in wanted], s))
    return out


def chunk_key(turns: Sequence[str], start: int, index: int) -> str:
    """Cache key of turn ``index``'s vector: the exact input it depends on (turns ``start..index``)."""
    return "chunk\x1e" + "\x1e".join(turns[start : index + 1])


def turn_mask(query: torch.Tensor, key: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which key tokens each query token attends to, from turn ids: (..., Q) and (..., K) -> (..., Q, K) bool.
    Turn-causal (a key of the same or an earlier turn; [CLS], turn -1, for all); with ``window``, only
    the ``window`` turns before the query's own (the pair encoder's view: ``ContextWindow.windowed``)."""
    q, k = query[..., :, None], key[..., None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (k >= q - window) | (k == -1)
    return allowed


def pad_chunks(chunks: Sequence[Chunk], pad_id: int, window: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` (B, L), ``attention_mask`` (B, L, L) turn-causal (:func:`turn_mask`), ``turn_ids`` and
    ``pool`` (B, L)."""
    width = max(len(c.input_ids) for c in chunks)
    ids = np.full((len(chunks), width), pad_id, np.int64)
    turns = np.full((len(chunks), width), PAD_TURN, np.int64)
    pool = np.zeros((len(chunks), width), np.int64)
    for b, c in enumerate(chunks):
        n = len(c.input_ids)
        ids[b, :n], turns[b, :n], pool[b, :n] = c.input_ids, c.turn_ids, c.pool
    t = torch.from_numpy(turns)
    mask = turn_mask(t, t, window).long()  # query row attends key column
    return {"input_ids": torch.from_numpy(ids), "attention_mask": mask, "turn_ids": t, "pool": torch.from_numpy(pool)}


def pool_chunks(hidden: torch.Tensor, batch: dict[str, torch.Tensor], chunks: Sequence[Chunk]) -> torch.Tensor:
    """Mean of each output turn's pooled tokens: ``hidden`` (B, L, H) -> (sum of outputs, H)."""
    rows = []
    for b, c in enumerate(chunks):
        local = torch.tensor([t for _, t in c.outputs], device=hidden.device)  # (k,)
        sel = (batch["turn_ids"][b][None, :] == local[:, None]) & (batch["pool"][b][None, :] > 0)  # (k, L)
        w = sel.to(hidden.dtype)
        rows.append(w @ hidden[b] / w.sum(1, keepdim=True).clamp(min=1.0))
    return torch.cat(rows)


def tokenize_turns(tokenizer: Any, turns: Sequence[str], turn_tokens: int) -> list[list[int]]:
    """Ids of each turn without special tokens, at most ``turn_tokens`` each."""
    if not turns:
        return []
    enc = tokenizer(list(turns), add_special_tokens=False, truncation=True, max_length=turn_tokens)
    return [list(x) for x in enc["input_ids"]]


def chunk_batches(chunks: Sequence[Chunk], max_tokens: int, max_padding: float | None) -> list[list[int]]:
    """Indices of ``chunks`` grouped by length (little padding), at most ``max_tokens`` padded tokens each."""
    from models.text_finetune import _length_batches

    lengths = [len(c.input_ids) for c in chunks]
    order = sorted(range(len(chunks)), key=lambda i: lengths[i])
    batches = []
    for group in _length_batches(order, lengths, len(chunks), max_padding):
        cur: list[int] = []
        for i in group:
            if cur and (len(cur) + 1) * lengths[i] > max_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
    return batches


def split_outputs(rows: np.ndarray, chunks: Sequence[Chunk]) -> list[np.ndarray]:
    """``rows`` (sum of the chunks' outputs, X), in chunk order -> one (k, X) array per chunk."""
    return np.split(rows, np.cumsum([len(c.outputs) for c in chunks])[:-1]) if chunks else []


@torch.no_grad()
def predict_chunks(
    model: Any,
    pad_id: int,
    chunks: Sequence[Chunk],
    device: str,
    max_tokens: int = 4096,
    amp: bool = False,
    max_padding: float | None = 0.25,
    window: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per chunk: ``(pooled (k, H) float32, probabilities (k, C) float32)`` of its outputs, in order
    (``window``: :func:`turn_mask`)."""
    if model.training:  # eval() walks every submodule: ~1.5 ms a call on a served model
        model.eval()
    pooled: list[np.ndarray] = [np.zeros((0, model.head.in_features), np.float32)] * len(chunks)
    probs: list[np.ndarray] = [np.zeros((0, model.head.out_features), np.float32)] * len(chunks)
    for idx in chunk_batches(chunks, max_tokens, max_padding):
        part = [chunks[i] for i in idx]
        batch = {k: v.to(device) for k, v in pad_chunks(part, pad_id, window).items()}
        with torch.autocast("cuda", enabled=amp and device.startswith("cuda")):
            vec, logits = model.forward_chunks(batch, part)
        vec, p = vec.float().cpu().numpy(), torch.softmax(logits.float(), -1).cpu().numpy()
        for i, v, q in zip(idx, split_outputs(vec, part), split_outputs(p, part), strict=True):
            pooled[i], probs[i] = v, q
    return pooled, probs


def training_chunks(
    tokens: Sequence[Sequence[Sequence[int]]],
    labels: Sequence[Sequence[int]],
    cls_id: int,
    sep_id: int,
    past: int,
    chunk: int,
    rng: random.Random | None,
) -> tuple[list[Chunk], list[list[int]]]:
    """Chunks of every conversation (random alignment when ``rng`` is given) and their outputs' labels;
    outputs without a label (-1) are dropped, chunks left without outputs too."""
    out, ys = [], []
    for conv, lab in zip(tokens, labels, strict=True):
        offset = rng.randrange(chunk) if rng is not None else 0
        for c in chunk_conversation(conv, cls_id, sep_id, past, chunk, offset, need=[y >= 0 for y in lab]):
            out.append(c)
            ys.append([lab[i] for i, _ in c.outputs])
    return out, ys


# ---------------------------------------------------------------- appends: keys and values kept per chunk

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (heads, L, head_dim) of one chunk


def supports_kv(encoder: Any) -> bool:
    """Whether :func:`forward_kv` can run ``encoder``: a BERT-family model (MiniLM) with plain submodules."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return getattr(getattr(encoder, "config", None), "model_type", None) == "bert" and layers is not None


def forward_kv(
    encoder: Any,
    input_ids: torch.Tensor,
    allowed: torch.Tensor,
    past: KV | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KV]:
    """The encoder's last hidden states (B, L, H) for ``input_ids`` (B, L), continuing ``past`` (the keys and
    values of the tokens before them, (B, heads, P, head_dim) per layer) under ``allowed`` (B, L, P + L) bool.
    ``offsets`` (B,): the position of each row's first new token (default P; rows whose past is padded
    to P have a smaller one, and ``allowed`` hides their padded past columns).

    The BERT layers of :mod:`transformers` computed step by step (embeddings at positions P.., then per
    layer: query/key/value, attention over past + new keys, output, feed-forward), so a chunk's earlier
    tokens, whose states never depend on a later turn (turn-causal mask), need not be encoded again
    when a turn is appended. Returns the hidden states and every layer's keys/values over P + L tokens.
    Equal to ``encoder(input_ids, attention_mask=...)`` on the whole input (tested to 1e-5).
    """
    b, n = input_ids.shape
    if offsets is None:
        offsets = torch.full((b,), past[0][0].shape[2] if past else 0, device=input_ids.device)
    positions = offsets[:, None] + torch.arange(n, device=input_ids.device)[None]  # (B, L)
    h = encoder.embeddings(input_ids=input_ids, position_ids=positions)
    mask = allowed[:, None]  # (B, 1, L, P + L)
    kv: KV = []
    for i, layer in enumerate(encoder.encoder.layer):
        att = layer.attention.self
        shape = (b, n, att.num_attention_heads, att.attention_head_size)
        q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (att.query, att.key, att.value))  # (B, heads, L, d)
        if past:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = layer.attention.output(ctx.transpose(1, 2).reshape(b, n, -1), h)
        h = layer.output(layer.intermediate(a), a)
        kv.append((k, v))
    return h, kv


@torch.no_grad()
def predict_chunks_kv(
    model: Any,
    pad_id: int,
    chunks: Sequence[Chunk],
    device: str,
    keep: Sequence[bool],
    max_tokens: int = 4096,
    window: int | None = None,
) -> tuple[list[np.ndarray], list[KV]]:
    """:func:`predict_chunks` through :func:`forward_kv`: per chunk its pooled outputs (k, H) and, where
    ``keep``, its keys/values (unpadded, on ``device``) for a later :func:`extend_chunks` ([] elsewhere)."""
    if model.training:
        model.eval()
    pooled: list[np.ndarray] = [np.zeros((0, model.head.in_features), np.float32)] * len(chunks)
    kvs: list[KV] = [[] for _ in chunks]
    for idx in chunk_batches(chunks, max_tokens, 0.25):
        part = [chunks[i] for i in idx]
        batch = {k: v.to(device) for k, v in pad_chunks(part, pad_id, window).items()}
        hidden, kv = forward_kv(model.encoder, batch["input_ids"], batch["attention_mask"].bool())
        vec = pool_chunks(hidden.float(), batch, part).cpu().numpy()
        for j, (i, c, v) in enumerate(zip(idx, part, split_outputs(vec, part), strict=True)):
            pooled[i] = v
            if keep[i]:
                n = len(c.input_ids)
                kvs[i] = [(key[j, :, :n].clone(), value[j, :, :n].clone()) for key, value in kv]
    return pooled, kvs


# The padding worth one more pass over the weights: a forward costs about a fixed ~15 ms (reading the
# weights) + ~0.35 ms a token, padded or not (MiniLM, 1 thread on this project's CPU: 12 tokens 20 ms,
# 40 tokens 26-31 ms, 100 tokens 46-55 ms), so a row joins a batch unless that adds more padding.
PASS_TOKENS = 40


@torch.no_grad()
def extend_chunks(
    model: Any,
    new: Sequence[Chunk],
    pasts: Sequence[KV],
    device: str,
    past_turns: Sequence[Sequence[int]],
    window: int | None = None,
) -> tuple[list[np.ndarray], list[KV]]:
    """Encode each ``new[j]`` (the appended turns of a chunk: their tokens only, local turn ids after the
    past ones) after ``pasts[j]`` (that chunk's earlier tokens' keys/values, (heads, P_j, head_dim) per
    layer; ``past_turns[j]``: their P_j local turn ids). Returns per chunk its pooled outputs (k, H) and the
    keys/values of the whole chunk (P_j + its tokens). A new token attends to the past tokens
    :func:`turn_mask` allows: every one of its chunk (all of an earlier turn, or [CLS]), or with
    ``window`` those of its ``window`` previous turns and [CLS].

    Rows are batched by length, shortest first: a row joins the current batch unless that adds more than
    :data:`PASS_TOKENS` padded tokens (then another pass over the weights is cheaper)."""
    if model.training:
        model.eval()
    order = sorted(range(len(new)), key=lambda j: len(new[j].input_ids))
    groups: list[list[int]] = []
    for j in order:
        n = len(new[j].input_ids)
        if groups and len(groups[-1]) * (n - len(new[groups[-1][-1]].input_ids)) <= PASS_TOKENS:
            groups[-1].append(j)
        else:
            groups.append([j])
    pooled: list[np.ndarray] = [np.zeros((0, model.head.in_features), np.float32)] * len(new)
    kvs: list[KV] = [[] for _ in new]
    for g in groups:
        turns = [past_turns[j] for j in g]
        vecs, kv = _extend_batch(model, [new[j] for j in g], [pasts[j] for j in g], device, turns, window)
        for j, v, k in zip(g, vecs, kv, strict=True):
            pooled[j], kvs[j] = v, k
    return pooled, kvs


def _extend_batch(
    model: Any,
    new: Sequence[Chunk],
    pasts: Sequence[KV],
    device: str,
    past_turns: Sequence[Sequence[int]],
    window: int | None = None,
) -> tuple[list[np.ndarray], list[KV]]:
    """:func:`extend_chunks` for one padded batch."""
    batch = {k: v.to(device) for k, v in pad_chunks(new, 0, window).items()}
    sizes = [p[0][0].shape[1] for p in pasts]
    width, n = max(sizes), batch["input_ids"].shape[1]
    allowed = torch.zeros(len(new), n, width, dtype=torch.bool, device=device)
    padded: KV = []
    for layer in range(len(pasts[0])):
        k0 = pasts[0][layer][0]
        keys = k0.new_zeros((len(new), k0.shape[0], width, k0.shape[2]))
        values = torch.zeros_like(keys)
        for j, p in enumerate(pasts):
            keys[j, :, : sizes[j]], values[j, :, : sizes[j]] = p[layer]
        padded.append((keys, values))
    for j, size in enumerate(sizes):
        key = torch.tensor(list(past_turns[j]), dtype=torch.long, device=device)  # (size,)
        allowed[j, :, :size] = turn_mask(batch["turn_ids"][j], key, window)
    allowed = torch.cat([allowed, batch["attention_mask"].bool()], 2)
    offsets = torch.tensor(sizes, device=device)
    hidden, kv = forward_kv(model.encoder, batch["input_ids"], allowed, padded, offsets)
    out = split_outputs(pool_chunks(hidden.float(), batch, new).cpu().numpy(), new)
    whole = []
    for j, (c, size) in enumerate(zip(new, sizes, strict=True)):  # drop each row's padding from its keys/values
        end = width + len(c.input_ids)
        whole.append([tuple(torch.cat([x[j, :, :size], x[j, :, width:end]], 1) for x in pair) for pair in kv])
    return out, whole
