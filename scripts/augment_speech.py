"""Noisy, re-encoded copies of a speech dataset's media: the recording conditions of real uploads.

Studio corpora (RAVDESS, Emo-DB) have digitally silent pauses; uploads and other corpora (CREMA-D:
MP3 at 44.1 kHz with a noise floor about 30 dB under the speech) do not. On a noise floor the pitch
tracker and the voice-quality functionals (F0, jitter, shimmer, HNR) read pauses as speech, and a voice
model trained on studio audio sees features it never met. Each copy here gets, per file (seeded by
the file name, so reruns are identical):

- white noise at an SNR drawn from [--snr-min, --snr-max] dB under the speech level (the 95th
  percentile of 20 ms frame levels),
- a gain drawn from +-``--gain-db`` dB,
- an MP3 round trip (libmp3lame through PyAV) at a bit rate drawn from 32, 64 or 128 kb/s.

Writes OUT/data (dataset.json renamed NAME-noisy, train.jsonl, dev.jsonl; never test) and OUT/media
(16 kHz FLAC, same file stems; other rates resampled), ready for ``merc extract --data OUT/data --media OUT/media``::

    .venv/bin/python scripts/augment_speech.py --data ../shared/data/ravdess8 \\
        --media ../shared/media/ravdess8 --out /tmp/merc-aug/ravdess8-noisy
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from math import gcd
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

RATE = 16_000
BITRATES = (32_000, 64_000, 128_000)


def speech_level_db(x: np.ndarray) -> float:
    """95th percentile of 20 ms frame RMS levels, dBFS: (S,) float mono -> a level."""
    n = len(x) // 320 * 320
    frames = x[:n].reshape(-1, 320) if n else x[None]
    return float(np.percentile(20 * np.log10(np.sqrt(np.mean(frames**2, axis=1)) + 1e-10), 95))


def mp3_round_trip(x: np.ndarray, bit_rate: int) -> np.ndarray:
    """(S,) float32 at RATE -> the same after MP3 encoding and decoding (length kept)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(x[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = RATE
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buf.seek(0)
    with av.open(buf) as inp:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        parts = [r.to_ndarray()[0] for f in inp.decode(audio=0) for r in resampler.resample(f)]
    y = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.pad(y, (0, max(0, len(x) - len(y))))[: len(x)]


def degrade(x: np.ndarray, name: str, snr: tuple[float, float], gain_db: float) -> np.ndarray:
    """(S,) float mono at RATE -> a noisy, re-gained, MP3-coded copy; seeded by ``name``."""
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    noise_db = speech_level_db(x) - rng.uniform(*snr)
    y = x + rng.standard_normal(len(x)) * 10 ** (noise_db / 20)
    y = y * 10 ** (rng.uniform(-gain_db, gain_db) / 20)
    y = mp3_round_trip(y.astype(np.float32), int(rng.choice(BITRATES)))
    return np.clip(y, -1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--media", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--snr-min", type=float, default=20.0)
    parser.add_argument("--snr-max", type=float, default=40.0)
    parser.add_argument("--gain-db", type=float, default=10.0)
    args = parser.parse_args()
    info = json.loads((args.data / "dataset.json").read_text())
    info["name"] = f"{info.get('name', args.data.name)}-noisy"
    info["augmentation"] = {"script": "scripts/augment_speech.py", "snr_db": [args.snr_min, args.snr_max],
                            "gain_db": args.gain_db, "mp3_bit_rates": list(BITRATES)}  # fmt: skip
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    (args.out / "media").mkdir(parents=True, exist_ok=True)
    (args.out / "data" / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    for split in ("train", "dev"):
        shutil.copy(args.data / f"{split}.jsonl", args.out / "data" / f"{split}.jsonl")
    files = sorted(p for p in args.media.iterdir() if p.suffix.lower() in {".flac", ".wav"})
    for i, path in enumerate(files):
        target = args.out / "media" / f"{path.stem}.flac"
        if target.exists():
            continue
        x, rate = sf.read(path, dtype="float32", always_2d=True)
        mono = x.mean(axis=1)
        if rate != RATE:
            g = gcd(rate, RATE)
            mono = resample_poly(mono, RATE // g, rate // g).astype(np.float32)
        sf.write(target, degrade(mono, path.name, (args.snr_min, args.snr_max), args.gain_db), RATE)
        if i % 200 == 0:
            print(f"{i}/{len(files)} {path.name}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
