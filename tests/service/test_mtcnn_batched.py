"""Batched MTCNN (service.features.mtcnn_batched) against facenet-pytorch's own MTCNN.detect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facenet_pytorch.models.utils.detect_face import imresample, pad
from torch.nn.functional import interpolate
from torchvision.ops import box_iou

from service.features.face_models import load_mtcnn
from service.features.mtcnn_batched import BatchedMTCNN, area_resize, crop_boxes, integral_images
from service.media.decode import FrameSampling, decode_media
from tests.service.media_helpers import SHARED_MEDIA

needs_shared = pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="../shared/media absent")


def frames_of(name: str, every: int = 12, limit: int = 8) -> np.ndarray:
    """Up to ``limit`` (B, H, W, 3) frames at 240p, one in ``every``, as the visual extractor samples them."""
    got: list[np.ndarray] = []
    sampling = FrameSampling(every=every, short_side=240)
    sink = lambda f, o, c: got.append(f)  # noqa: E731
    decode_media(SHARED_MEDIA / name, [(0.0, None)], want_audio=False, sink=sink, sampling=sampling)
    return np.concatenate(got)[:limit]


def test_area_resize_is_area_interpolation() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    table = integral_images(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    for size in [(19, 27), (12, 12), (37, 53), (30, 41)]:
        expected = interpolate(x, size, mode="area").numpy()
        np.testing.assert_allclose(area_resize(table, size).numpy(), expected, atol=1e-3)


def test_crops_match_facenets_per_box_resize() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (2, 60, 80, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.4, 5.2, 40.9, 35.7], [-6.0, -3, 20, 23], [70, 50, 95, 75], [2, 2, 9, 9]])
    owners = torch.tensor([0, 1, 0, 1])
    crops, keep = crop_boxes(integral_images(frames), boxes, owners, 24)
    assert keep.all() and crops.shape == (4, 3, 24, 24)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    y, ey, x, ex = pad(boxes.clone(), 80, 60)
    for k in range(4):
        ref = imresample(images[owners[k], :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]][None], (24, 24))
        np.testing.assert_allclose(crops[k].numpy(), ((ref - 127.5) * 0.0078125)[0].numpy(), atol=1e-4)


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "no_face.mp4"])
def test_boxes_match_facenet_detect(name: str) -> None:
    reference = load_mtcnn(torch.device("cpu"), 24, (0.6, 0.7, 0.7))
    frames = frames_of(name)
    found = BatchedMTCNN(reference).detect(frames)
    for frame, faces in zip(frames, found, strict=True):
        boxes, probs, points = reference.detect(frame, landmarks=True)
        if boxes is None:
            assert len(faces.boxes) == 0
            continue
        boxes, probs, points = (np.asarray(a, np.float32) for a in (boxes, probs, points))
        assert len(faces.boxes) == len(boxes)
        best = int(np.argmax(probs))
        iou = box_iou(torch.from_numpy(boxes[best : best + 1]), torch.from_numpy(faces.boxes[:1]))
        assert float(iou) > 0.9
        assert abs(float(probs[best]) - float(faces.probs[0])) < 1e-3
        assert np.abs(points[best] - faces.points[0]).max() < 2.0
    has_face = [len(f.boxes) > 0 for f in found]
    if name == "no_face.mp4":  # facenet itself (checked above) takes the title's lettering for a face once (p 0.83)
        assert sum(has_face) <= 1
    else:
        assert all(has_face)


def test_faces_between_detections_are_interpolated() -> None:
    from service.features.mtcnn_batched import Faces
    from service.features.visual import PendingFrame, _is_keyframe, track_faces

    def faces(x: float, *more: float) -> Faces:
        xs = [x, *more]
        boxes = np.array([[v, 10, v + 20, 30] for v in xs], np.float32)
        return Faces(boxes, np.full(len(xs), 0.9, np.float32), np.tile(boxes[:, None, :2], (1, 5, 1)))

    a, b = object(), object()
    items = [PendingFrame(s, np.zeros((4, 4, 3), np.uint8), None, [0], k) for s, k in [(a, 0), (b, 0), (a, 1), (a, 2)]]
    assert [_is_keyframe(items, i, 2) for i in range(4)] == [True, True, False, True]
    tracked = track_faces(items, {0: faces(0.0), 1: faces(50.0), 3: faces(10.0, 300.0)})
    np.testing.assert_allclose(tracked[2].boxes, [[5, 10, 25, 30]])  # halfway between frames 0 and 2 of a
    assert tracked[1].boxes[0, 0] == 50.0  # another file's detection is never used
    far = track_faces(items[2:], {1: faces(0.0), 0: faces(0.0)})[0]
    assert far.boxes[0, 0] == 0.0
    jump = track_faces([items[0], items[2], items[3]], {0: faces(0.0), 2: faces(200.0)})[1]
    assert jump.boxes[0, 0] == 0.0  # the face 200 px away is another face: keep the earlier box
