"""Spoken test media: a conversation of espeak-ng turns in two voices, alone or under a real face video."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from service.media.decode import decode_media
from tests.service.media_helpers import SHARED_MEDIA, write_wav

RATE = 16000
FACE_VIDEO = SHARED_MEDIA / "WolfgangLanger_Pexels.mp4"  # 19.7 s, one face, no sound
TURNS = [
    ("en+m3", "My flight got cancelled again and nobody told me why."),
    ("en+f3", "I am so sorry to hear that. Shall I book you on the next one?"),
    ("en+m3", "Yes please, and this time make sure it actually leaves."),
]
CREMAD_TEXT = "Don't forget a jacket."


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def spoken(tmp: Path, voice: str, text: str) -> np.ndarray:
    """(n,) float32 16 kHz: ``text`` said by espeak-ng's ``voice``."""
    wav = tmp / f"turn-{abs(hash((voice, text)))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    return decode_media(wav, [(0.0, None)]).audio


def conversation_audio(
    tmp: Path, turns: list[tuple[str, str]] = TURNS, pause: float = 0.9, lead: float = 0.5
) -> tuple[np.ndarray, list[dict]]:
    """The turns one after another with ``pause`` s between them; and per turn voice, text, start, end."""
    gap = np.zeros(round(pause * RATE), np.float32)
    parts, truth, t = [np.zeros(round(lead * RATE), np.float32)], [], lead
    for voice, text in turns:
        signal = spoken(tmp, voice, text)
        truth.append({"voice": voice, "text": text, "start": round(t, 3), "end": round(t + len(signal) / RATE, 3)})
        parts += [signal, gap]
        t += (len(signal) + len(gap)) / RATE
    return np.concatenate(parts), truth


def conversation_wav(tmp: Path, turns: list[tuple[str, str]] = TURNS) -> tuple[Path, list[dict]]:
    signal, truth = conversation_audio(tmp, turns)
    return write_wav(tmp / "conversation.wav", signal), truth


def talking_video(path: Path, signal: np.ndarray, face_video: Path = FACE_VIDEO) -> Path:
    """``face_video``'s H.264 packets (copied, not re-encoded) cut to the signal's length, with it as AAC."""
    seconds = len(signal) / RATE
    with av.open(str(face_video)) as src, av.open(str(path), "w") as out:
        vin = src.streams.video[0]
        vout = out.add_stream_from_template(vin)
        sound = out.add_stream("aac", rate=RATE, layout="mono")
        for packet in src.demux(vin):
            if packet.dts is None:
                continue
            if packet.pts is not None and packet.pts * vin.time_base > seconds:
                break
            packet.stream = vout
            out.mux(packet)
        for i in range(0, len(signal), 1024):
            frame = av.AudioFrame.from_ndarray(signal[None, i : i + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, i, Fraction(1, RATE)
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    return path


def transcript_json(truth: list[dict]) -> dict:
    """The supplied-transcript form of ``truth`` (speaker = voice)."""
    return {
        "utterances": [{"speaker": t["voice"], "text": t["text"], "start": t["start"], "end": t["end"]} for t in truth]
    }
