"""MTCNN face detection over frame batches: facenet-pytorch's networks and weights, batched resampling.

Why this module exists
----------------------
facenet-pytorch's ``detect_face`` runs the three MTCNN networks (PNet on an image pyramid, RNet on
24x24 candidate crops, ONet on 48x48 crops) on whole batches, but it cuts and area-resizes every
candidate box with its own ``interpolate`` call (a Python loop over ~40 boxes per frame), builds every
pyramid level with adaptive average pooling (slow for the pyramid's non-integer ratios), runs PNet on
the whole batch at once (first-level feature maps of ~70 MB for 32 frames, far out of cache), and its
3x3 max-pools run in NCHW layout, about twice as slow on CPU as channels-last. On a 2-core CPU this
made it ~1.8x slower than this module.

What is different from ``facenet_pytorch.MTCNN.detect`` (same results, other arithmetic)
-----------------------------------------------------------------------------------------
* Area interpolation (pyramid levels and candidate crops) is read from one integer summed-area table
  per frame: every output cell is an exact pixel sum over the same rectangle PyTorch's adaptive
  pooling uses, so the values equal ``interpolate(mode="area")`` up to float rounding; all crops of a
  stage come from four gathers instead of a loop of resize calls. The crop rectangles are facenet's
  (``pad``: integer box clipped to the frame).
* PNet runs ``chunk`` frames at a time through every level; PNet, RNet and ONet are private copies in
  channels-last layout.
* Degenerate candidates (no pixel inside the frame) are dropped with their scores; facenet keeps their
  scores, which misaligns boxes and scores in that rare case.

Everything else (pyramid scales, thresholds, NMS order and kinds, box regression, landmarks) is
facenet's, through its helper functions. tests/service/test_mtcnn_batched.py checks crops and pyramid
against facenet's resizing and boxes (IoU > 0.9), scores and landmarks against ``MTCNN.detect`` on the
shared videos (they agree to float rounding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms_numpy,
    bbreg,
    generateBoundingBox,
    pad,
    rerec,
)
from torchvision.ops import batched_nms


@dataclass
class Faces:
    """The faces MTCNN found in one image (``n`` may be 0).

    Attributes:
        boxes: (n, 4) float32 ``x1, y1, x2, y2`` in pixels of the image given to ``detect``.
        probs: (n,) float32 ONet face probabilities.
        points: (n, 5, 2) float32 landmarks ``(x, y)``: left eye, right eye, nose, mouth corners.
    """

    boxes: np.ndarray
    probs: np.ndarray
    points: np.ndarray


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """facenet's pyramid: the first scale maps ``min_face_size`` px to PNet's 12 px cell."""
    scale, side, scales = 12.0 / min_face_size, min(height, width) * 12.0 / min_face_size, []
    while side >= 12:
        scales.append(scale)
        scale, side = scale * factor, side * factor
    return scales


def integral_images(frames: np.ndarray) -> torch.Tensor:
    """Summed-area tables (B, H + 1, W + 1, 3) int32 of (B, H, W, 3) uint8 frames (row/column 0 are zeros).

    Exact for frames up to 8.4 M pixels (255 H W < 2^31). NumPy's cumulative sums are ~3x faster than torch's here.
    """
    b, h, w, c = frames.shape
    table = np.zeros((b, h + 1, w + 1, c), np.int32)
    np.cumsum(frames, axis=1, dtype=np.int32, out=table[:, 1:, 1:])
    np.cumsum(table[:, 1:, 1:], axis=2, out=table[:, 1:, 1:])
    return torch.from_numpy(table)


def area_bins(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel ranges [lo, hi) (K, size) of ``size`` cells over ``length`` (K,) pixels from ``start`` (K,).

    PyTorch's adaptive average pooling (= ``interpolate(mode="area")``): cell i spans pixels
    ``floor(i L / size)`` to ``ceil((i + 1) L / size)``.
    """
    i = torch.arange(size, dtype=torch.int64)
    length = length.to(torch.int64)[:, None]
    return start[:, None] + i * length // size, start[:, None] + ((i + 1) * length + size - 1) // size


def area_resize(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area interpolation of the frames behind ``table`` (n, H + 1, W + 1, 3) to ``size`` (h, w).

    Returns (n, 3, h, w) float32 in 0..255, channels-last in memory (PNet runs faster on it): the
    values of ``interpolate(frames, size, mode="area")`` from four slabs of the summed-area table,
    several times cheaper than adaptive average pooling for the non-integer ratios of the pyramid.
    """
    one, sat = torch.zeros(1, dtype=torch.int64), table.numpy()  # NumPy's gathers are faster here
    rlo, rhi = (b[0].numpy() for b in area_bins(one, torch.tensor([sat.shape[1] - 1]), size[0]))
    clo, chi = (b[0].numpy() for b in area_bins(one, torch.tensor([sat.shape[2] - 1]), size[1]))
    rows = sat[:, rhi] - sat[:, rlo]
    cells = rows[:, :, chi] - rows[:, :, clo]
    scale = 1.0 / ((rhi - rlo)[:, None] * (chi - clo)[None, :]).astype(np.float32)
    return torch.from_numpy(cells.astype(np.float32) * scale[None, :, :, None]).permute(0, 3, 1, 2)


def area_sample(table: torch.Tensor, owners: torch.Tensor, rows, cols) -> torch.Tensor:
    """Means (K, Y, X, 3) float32 over the pixel rectangles ``rows`` x ``cols`` of frame ``owners`` (K,).

    ``rows`` = (lo, hi) each (K, Y), ``cols`` (K, X), from :func:`area_bins`; ``table`` from
    :func:`integral_images`. Four gathers of exact integer sums: the values of area interpolation.
    """
    _, hp, wp, c = table.shape
    flat = table.reshape(-1, c)
    base = (owners * (hp * wp))[:, None, None]
    y0, y1 = rows[0][:, :, None] * wp, rows[1][:, :, None] * wp
    x0, x1 = cols[0][:, None, :], cols[1][:, None, :]

    def corner(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, (base + y + x).reshape(-1))

    total = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
    area = ((rows[1] - rows[0])[:, :, None] * (cols[1] - cols[0])[:, None, :]).reshape(-1, 1).float()
    return (total.float() / area).view(len(owners), rows[0].shape[1], cols[0].shape[1], c)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """MTCNN's input scaling of 0..255 values, in place: (x - 127.5) / 128."""
    return x.sub_(127.5).mul_(0.0078125)


def crop_boxes(table: torch.Tensor, boxes: torch.Tensor, owners: torch.Tensor, size: int):
    """Candidate crops (K, 3, size, size) normalised channels-last, and the (N,) mask of boxes with pixels.

    ``boxes`` (N, >=4) in frame pixels, ``owners`` (N,) frame index. The rectangles are facenet's
    ``pad`` (integer box clipped to the frame), resized by area interpolation as facenet does.
    """
    y, ey, x, ex = (torch.from_numpy(v.astype(np.int64)) for v in pad(boxes, table.shape[2] - 1, table.shape[1] - 1))
    keep = (ey > y - 1) & (ex > x - 1)
    y, ey, x, ex = y[keep] - 1, ey[keep], x[keep] - 1, ex[keep]
    rows, cols = area_bins(y, ey - y, size), area_bins(x, ex - x, size)
    return _normalise(area_sample(table, owners[keep], rows, cols)).permute(0, 3, 1, 2), keep


def _chunked(net: torch.nn.Module, x: torch.Tensor, device, chunk: int = 512) -> tuple[torch.Tensor, ...]:
    """``net`` on (K, 3, s, s) crops, ``chunk`` at a time (bounded GPU memory); outputs back on the CPU."""
    outs = [net(x[i : i + chunk].to(device)) for i in range(0, len(x), chunk)]
    return tuple(torch.cat(parts).float().cpu() for parts in zip(*outs, strict=True))


def _regress(found: torch.Tensor) -> torch.Tensor:
    """PNet rows (N, 9) ``x1 y1 x2 y2 score dx1 dy1 dx2 dy2`` -> regressed, squared (N, 5) boxes."""
    width, height = found[:, 2] - found[:, 0], found[:, 3] - found[:, 1]
    shift = found[:, 5:9] * torch.stack([width, height, width, height], dim=1)
    return rerec(torch.cat([found[:, :4] + shift, found[:, 4:5]], dim=1))


class BatchedMTCNN:
    """facenet-pytorch MTCNN networks with batched crops (see the module docstring).

    The networks are private copies (RNet/ONet in channels-last layout, about twice as fast on CPU
    for their 3x3 max-pools), so the facenet ``MTCNN`` passed in is left as it was.
    """

    def __init__(self, mtcnn, chunk: int = 8) -> None:
        self.pnet = copy.deepcopy(mtcnn.pnet).eval().to(memory_format=torch.channels_last)
        self.rnet = copy.deepcopy(mtcnn.rnet).eval().to(memory_format=torch.channels_last)
        self.onet = copy.deepcopy(mtcnn.onet).eval().to(memory_format=torch.channels_last)
        self.min_face_size, self.factor = float(mtcnn.min_face_size), float(mtcnn.factor)
        self.thresholds = tuple(float(t) for t in mtcnn.thresholds)
        self.device = mtcnn.device
        self.chunk = chunk

    @torch.inference_mode()
    def detect(self, frames: np.ndarray | torch.Tensor) -> list[Faces]:
        """Faces per frame of ``frames`` (B, H, W, 3) uint8 RGB, most probable first."""
        frames = np.ascontiguousarray(np.asarray(frames, dtype=np.uint8))
        table = integral_images(frames)
        boxes, owners = self._proposals(table)
        points = torch.zeros(0, 5, 2)
        if len(boxes):
            boxes, owners = self._refine(table, boxes, owners)
            if len(boxes):
                boxes, owners, points = self._output(table, boxes, owners)
        return self._split(len(frames), boxes, owners, points)

    def _proposals(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: PNet over the pyramid -> (N, 5) squared boxes with scores, (N,) frame index.

        ``chunk`` frames at a time through every pyramid level (cache-sized feature maps).
        """
        n, h, w = table.shape[0], table.shape[1] - 1, table.shape[2] - 1
        boxes, owners = [torch.zeros(0, 9)], [torch.zeros(0, dtype=torch.long)]
        scales = pyramid_scales(h, w, self.min_face_size, self.factor)
        for start in range(0, n, self.chunk):
            chunk = table[start : start + self.chunk]
            for scale in scales:
                level = area_resize(chunk, (int(h * scale + 1), int(w * scale + 1)))
                reg, probs = self.pnet(_normalise(level).to(self.device))
                found, inds = generateBoundingBox(reg, probs[:, 1], scale, self.thresholds[0])
                pick = batched_nms(found[:, :4], found[:, 4], inds, 0.5)
                boxes.append(found[pick].cpu())
                owners.append(inds[pick].cpu() + start)
        found, inds = torch.cat(boxes), torch.cat(owners)
        pick = batched_nms(found[:, :4], found[:, 4], inds, 0.7)
        return _regress(found[pick]), inds[pick]

    def _refine(self, table, boxes, owners) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: RNet on 24x24 crops, threshold, NMS, box regression."""
        crops, keep = crop_boxes(table, boxes, owners, 24)
        boxes, owners = boxes[keep], owners[keep]
        if not len(boxes):
            return boxes, owners
        reg, probs = _chunked(self.rnet, crops, self.device)
        ok = probs[:, 1] > self.thresholds[1]
        boxes, owners, reg = torch.cat([boxes[ok, :4], probs[ok, 1:2]], dim=1), owners[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], owners, 0.7)
        return rerec(bbreg(boxes[pick], reg[pick])), owners[pick]

    def _output(self, table, boxes, owners) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: ONet on 48x48 crops -> boxes, landmarks (N, 5, 2), 'Min' NMS."""
        crops, keep = crop_boxes(table, boxes, owners, 48)
        boxes, owners = boxes[keep], owners[keep]
        if not len(boxes):
            return boxes, owners, torch.zeros(0, 5, 2)
        reg, marks, probs = _chunked(self.onet, crops, self.device)
        ok = probs[:, 1] > self.thresholds[2]
        boxes, owners, reg, marks = torch.cat([boxes[ok, :4], probs[ok, 1:2]], dim=1), owners[ok], reg[ok], marks[ok]
        width = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        height = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.stack([width * marks[:, :5] + boxes[:, :1] - 1, height * marks[:, 5:] + boxes[:, 1:2] - 1], 2)
        boxes = bbreg(boxes, reg)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], owners, 0.7, "Min")
        return boxes[pick], owners[pick], points[pick]

    @staticmethod
    def _split(n: int, boxes: torch.Tensor, owners: torch.Tensor, points: torch.Tensor) -> list[Faces]:
        """Per image: its rows, most probable first."""
        boxes, points, owners = boxes.float().cpu().numpy(), points.float().cpu().numpy(), owners.cpu().numpy()
        out = []
        for i in range(n):
            mine = owners == i
            order = np.argsort(-boxes[mine, 4], kind="stable")
            out.append(Faces(boxes[mine][order, :4], boxes[mine][order, 4], points[mine][order]))
        return out
