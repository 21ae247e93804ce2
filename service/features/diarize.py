"""Who speaks when: one voice embedding per utterance, clustered into speakers.

The embedding is Resemblyzer's GE2E speaker encoder (Wan et al., ICASSP 2018; 3-layer LSTM over
40 mel bands, 256-d, trained on LibriSpeech + VoxCeleb 1/2), whose ``pretrained.pt`` ships inside
the ``resemblyzer`` wheel (installed with --no-deps, see scripts/install-extras.sh). Only the
weights are read from the package: the front end (volume normalisation, a 25 ms / 10 ms power mel
spectrogram with Slaney filters, 1.6 s partials at 1.3 per second) is reimplemented here in numpy,
so that librosa, numba and webrtcvad, which the package's own code imports, are not needed.

Utterances are grouped by average-linkage agglomerative clustering on cosine distance with a
fixed threshold (:data:`DISTANCE_THRESHOLD`, the best adjusted Rand index on Emo-DB train speakers,
0.69: ``benchmarks/asr.py --speakers``, docs/benchmarks.md); speakers are named ``speaker1``,
``speaker2``, ... in order of first speech.
"""

from __future__ import annotations

import importlib.util
import threading
from functools import cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40  # 25 ms window, 10 ms step
PARTIAL_FRAMES = 160  # 1.6 s
PARTIAL_RATE = 1.3  # partials per second
TARGET_DBFS = -30.0
DISTANCE_THRESHOLD = 0.35
MIN_SECONDS = 0.3  # shorter utterances get the speaker of the nearest longer one


class SpeakerModelMissing(RuntimeError):
    """The ``resemblyzer`` package (its pretrained encoder) is not installed."""


def weights_path() -> Path:
    """``pretrained.pt`` of the installed resemblyzer package (its code is not imported)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise SpeakerModelMissing("the resemblyzer package is not installed (scripts/install-extras.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise SpeakerModelMissing(f"{path}: missing from the resemblyzer package")
    return path


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


@cache
def mel_filters() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) Slaney-normalised triangular filters from 0 Hz to 8 kHz."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """(n,) float32 at 16 kHz -> (frames, 40) power mel spectrogram (centred frames, zero padding)."""
    padded = np.pad(wav.astype(np.float32), N_FFT // 2)
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2
    return (power.astype(np.float32) @ mel_filters().T).astype(np.float32)


def normalise_volume(wav: np.ndarray) -> np.ndarray:
    """Raise (never lower) the level to -30 dBFS, as the encoder was trained."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if len(wav) else 0.0
    if rms <= 1e-8:
        return wav
    change = TARGET_DBFS - 20 * np.log10(rms)
    return wav * np.float32(10 ** (change / 20)) if change > 0 else wav


def partials(wav: np.ndarray) -> np.ndarray:
    """(P, 160, 40) mel windows of 1.6 s covering ``wav`` (zero padded; at least one)."""
    mel = mel_spectrogram(normalise_volume(wav))
    step = max(1, round(SAMPLE_RATE / PARTIAL_RATE / HOP))
    starts = list(range(0, max(1, len(mel) - PARTIAL_FRAMES + step), step))
    last = starts[-1]
    if len(starts) > 1 and (len(mel) - last) / PARTIAL_FRAMES < 0.75:
        starts.pop()
    out = np.zeros((len(starts), PARTIAL_FRAMES, N_MELS), dtype=np.float32)
    for k, s in enumerate(starts):
        chunk = mel[s : s + PARTIAL_FRAMES]
        out[k, : len(chunk)] = chunk
    return out


class VoiceEncoder:
    """The pretrained GE2E encoder: (P, 160, 40) mel partials -> (P, 256) L2-normalised embeddings."""

    def __init__(self, device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)["model_state"]
        self.lstm = torch.nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)
        self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        self.lstm.to(self.device).eval()
        self.linear.to(self.device).eval()

    def embed(self, wavs: list[np.ndarray]) -> np.ndarray:
        """(U, 256) one L2-normalised embedding per utterance (mean of its partials), in one batch."""
        import torch

        parts = [partials(w) for w in wavs]
        owners = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        with torch.inference_mode():
            x = torch.from_numpy(np.concatenate(parts)).to(self.device)
            _, (hidden, _) = self.lstm(x)
            e = torch.relu(self.linear(hidden[-1]))
            e = (e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)).cpu().numpy()
        out = np.stack([e[owners == u].mean(axis=0) for u in range(len(parts))])
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)


_ENCODERS: dict[str, VoiceEncoder] = {}
_LOCK = threading.Lock()


def voice_encoder(device: str = "cpu") -> VoiceEncoder:
    """The encoder loaded once per process and device; SpeakerModelMissing without resemblyzer."""
    with _LOCK:
        if device not in _ENCODERS:
            _ENCODERS[device] = VoiceEncoder(device)
        return _ENCODERS[device]


def cluster(embeddings: np.ndarray, threshold: float = DISTANCE_THRESHOLD) -> list[int]:
    """Cluster ids (0, 1, ... in order of first appearance) for (U, D) L2-normalised embeddings."""
    if len(embeddings) < 2:
        return [0] * len(embeddings)
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=threshold
    ).fit_predict(embeddings)
    order: dict[int, int] = {}
    return [order.setdefault(int(c), len(order)) for c in labels]


def assign_speakers(wavs: list[np.ndarray], device: str = "cpu", threshold: float = DISTANCE_THRESHOLD) -> list[str]:
    """``speaker1``, ``speaker2``, ... per utterance (16 kHz mono cuts).

    Cuts shorter than :data:`MIN_SECONDS` carry too little voice to embed; each takes the
    speaker of the nearest (in time order) longer cut. Raises SpeakerModelMissing.
    """
    long = [i for i, w in enumerate(wavs) if len(w) >= MIN_SECONDS * SAMPLE_RATE]
    if not long:
        return ["speaker1"] * len(wavs)
    ids = cluster(voice_encoder(device).embed([wavs[i] for i in long]), threshold)
    by_index = dict(zip(long, ids, strict=True))
    nearest = [by_index[min(long, key=lambda j, i=i: abs(j - i))] for i in range(len(wavs))]
    order: dict[int, int] = {}
    return [f"speaker{order.setdefault(c, len(order)) + 1}" for c in nearest]
