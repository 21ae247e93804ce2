"""Audio features: openSMILE functionals per utterance, from in-memory 16 kHz signals.

Extractors
----------
``compare2016`` (6373-d)
    openSMILE ComParE_2016 functionals, the acoustic set of the MERC papers.
``egemaps-v02`` (88-d)
    openSMILE eGeMAPSv02 functionals (the compact Geneva minimalistic set).

Signals go to openSMILE as NumPy arrays (no temporary files). Utterances run on a small thread pool:
the native openSMILE library releases the GIL, so two cores extract two utterances at once.

Presence: an utterance whose segment is shorter than ``min_seconds``, whose loud part is below
``silence_dbfs`` (default -60, or ``$MERC_SILENCE_DBFS``; silence, or the zero padding of a late
stream) or whose functionals are not finite is marked absent (None); no vector is made up for it.
The loud part is the 95th percentile of the 20 ms frame levels (:func:`loud_dbfs`), not the RMS of
the whole cut: quiet speech framed by a second of silence (RAVDESS actor 20's calm takes: whole-cut
RMS -61 to -64 dBFS, peaks at -40 dBFS) is speech.

openSMILE is free for research and education only (audEERING's research licence); commercial use
needs a licence from audEERING. See the README.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import numpy as np

from service.features.registry import DEFAULTS
from service.features.text import FeatureSpec
from service.media.decode import SAMPLE_RATE

AUDIO_SETS: dict[str, tuple[str, int]] = {"compare2016": ("ComParE_2016", 6373), "egemaps-v02": ("eGeMAPSv02", 88)}
DEFAULT_AUDIO_EXTRACTOR = DEFAULTS["audio"]


def rms_dbfs(signal: np.ndarray) -> float:
    """RMS level of a float signal in dB relative to full scale (-inf for digital silence)."""
    if signal.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def loud_dbfs(signal: np.ndarray, quantile: float = 95.0) -> float:
    """The ``quantile`` of a signal's 20 ms frame RMS levels in dBFS (the whole signal's when shorter)."""
    hop = SAMPLE_RATE // 50
    if signal.size < hop:
        return rms_dbfs(signal)
    frames = signal[: signal.size // hop * hop].reshape(-1, hop)
    power = np.mean(np.square(frames, dtype=np.float64), axis=1)
    loud = float(np.percentile(power, quantile))
    return 10.0 * np.log10(loud) if loud > 0 else float("-inf")


class OpenSmileExtractor:
    """openSMILE functionals for many utterance signals; ``spec`` names set, version and dimension."""

    def __init__(
        self, name: str = DEFAULT_AUDIO_EXTRACTOR, workers: int | None = None, silence_dbfs: float = -60.0
    ) -> None:
        import opensmile

        if name not in AUDIO_SETS:
            raise ValueError(f"unknown audio extractor {name!r}; known: {sorted(AUDIO_SETS)}")
        feature_set, dim = AUDIO_SETS[name]
        self.smile = opensmile.Smile(
            feature_set=getattr(opensmile.FeatureSet, feature_set), feature_level=opensmile.FeatureLevel.Functionals
        )
        version = f"opensmile=={metadata.version('opensmile')};{feature_set};functionals;16kHz-mono"
        self.spec = FeatureSpec(name, version, dim)
        self.workers = workers or int(os.environ.get("MERC_AUDIO_WORKERS", min(2, os.cpu_count() or 1)))
        self.silence_dbfs = float(os.environ.get("MERC_SILENCE_DBFS", silence_dbfs))
        self.min_seconds = 0.1

    def usable(self, signal: np.ndarray | None) -> bool:
        """Long enough and its loud part not silent."""
        return (
            signal is not None
            and signal.size >= self.min_seconds * SAMPLE_RATE
            and loud_dbfs(signal) >= self.silence_dbfs
        )

    def one(self, signal: np.ndarray) -> np.ndarray | None:
        """Functionals (dim,) float32 of one (n,) float32 signal at 16 kHz; None when not finite."""
        values = self.smile.process_signal(np.ascontiguousarray(signal, dtype=np.float32), SAMPLE_RATE)
        vec = values.to_numpy(dtype=np.float32).reshape(-1)
        if vec.shape != (self.spec.dim,) or not np.isfinite(vec).all():
            return None
        return vec

    def extract(self, signals: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
        """One (dim,) float32 vector per signal, None for absent, too short or silent ones."""
        jobs = [i for i, s in enumerate(signals) if self.usable(s)]
        out: list[np.ndarray | None] = [None] * len(signals)
        if self.workers <= 1 or len(jobs) <= 1:
            results = [self.one(signals[i]) for i in jobs]
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                results = list(pool.map(lambda i: self.one(signals[i]), jobs))
        for i, vec in zip(jobs, results, strict=True):
            out[i] = vec
        return out
