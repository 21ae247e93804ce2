"""Speech recognition on our spoken test media: word error rate, seconds and real-time factor.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/asr.py [--device cpu] [--json out.json]

Sets (each skipped when its media or tool is absent):

* ``espeak``: two conversations of espeak-ng turns in a male and a female voice (synthetic speech,
  known text, times and speakers), as service.features.speech sees an upload without transcript;
* ``cremad``: the six CREMA-D clips of ../shared/media/cremad (FLV, real acted speech of one actor,
  "Don't forget a jacket." in six emotions).

Per set: WER (jiwer, lower-cased, punctuation removed; all words of the set pooled), utterances
found vs spoken, speakers found vs present, seconds of audio, seconds of recognition (VAD, Whisper,
speaker clustering; warm: models loaded before timing) and the real-time factor (seconds per second
of audio). ``--speakers`` adds the speaker-clustering threshold study on Emo-DB train speakers
(German, 2 s clips; pairs of speakers, 8 utterances): adjusted Rand index and how often the number
of speakers comes out right, per distance threshold.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.features.speech import recognizer  # noqa: E402
from service.media.decode import SAMPLE_RATE, decode_media  # noqa: E402
from tests.service.speech_media import CREMAD_TEXT, TURNS, conversation_audio  # noqa: E402

SHARED = ROOT.parent / "shared"
MORE_TURNS = [
    ("en+f3", "Good morning. How can I help you today?"),
    ("en+m3", "My order arrived broken and I want a refund."),
    ("en+f3", "I understand. Could you tell me the order number, please?"),
    ("en+m3", "It is four five two nine. This is the second time it has happened."),
]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    return float(jiwer.wer(" ".join(map(normalise, refs)), " ".join(map(normalise, hyps))))


def run_set(name: str, items: list[tuple[np.ndarray, list[str], int]], device: str) -> dict:
    """``items``: (signal, spoken texts in order, speakers present)."""
    refs, hyps, audio_s, seconds = [], [], 0.0, {}
    found = spoken = right_speakers = 0
    for signal, texts, n_speakers in items:
        started = time.perf_counter()
        transcript = recognizer(device).transcribe(signal)
        elapsed = time.perf_counter() - started
        for k, v in transcript.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        seconds["total"] = seconds.get("total", 0.0) + elapsed
        audio_s += len(signal) / SAMPLE_RATE
        refs.append(" ".join(texts))
        hyps.append(" ".join(u.text for u in transcript.utterances))
        found, spoken = found + len(transcript.utterances), spoken + len(texts)
        right_speakers += len({u.speaker for u in transcript.utterances}) == n_speakers
    return {
        "set": name,
        "items": len(items),
        "wer": round(wer(refs, hyps), 4),
        "words": sum(len(normalise(r).split()) for r in refs),
        "utterances_found": found,
        "utterances_spoken": spoken,
        "speaker_count_right": f"{right_speakers}/{len(items)}",
        "audio_s": round(audio_s, 2),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "rtf": round(seconds.get("total", 0.0) / audio_s, 4) if audio_s else None,
        "hypotheses": hyps,
    }


def espeak_items(tmp: Path) -> list[tuple[np.ndarray, list[str], int]]:
    items = []
    for turns in (TURNS, MORE_TURNS):
        signal, truth = conversation_audio(tmp, turns)
        items.append((signal, [t["text"] for t in truth], len({v for v, _ in turns})))
    return items


def cremad_items() -> list[tuple[np.ndarray, list[str], int]]:
    clips = sorted((SHARED / "media" / "cremad").glob("*.flv"))
    return [(decode_media(c, [(0.0, None)]).audio, [CREMAD_TEXT], 1) for c in clips]


def speaker_study(thresholds: list[float], trials: int = 30) -> list[dict]:
    """Threshold grid on Emo-DB train speakers (never dev/test): ARI and right speaker counts."""
    from faster_whisper.vad import get_speech_timestamps
    from sklearn.metrics import adjusted_rand_score

    from service.features.diarize import cluster, voice_encoder
    from service.features.speech import vad_options

    speaker_of = {}
    for line in (SHARED / "data" / "emodb7" / "train.jsonl").read_text().splitlines():
        for u in json.loads(line)["utterances"]:
            speaker_of[u["id"]] = u["speaker"]
    media = SHARED / "media" / "emodb7"
    by: dict[str, list[str]] = {}
    for uid, spk in speaker_of.items():
        if (media / f"{uid}.wav").is_file():
            by.setdefault(spk, []).append(uid)
    chosen = [u for s in sorted(by) for u in by[s][:12]]
    wavs = []
    for uid in chosen:  # the speech regions only, as the pipeline cuts utterances
        w = decode_media(media / f"{uid}.wav", [(0.0, None)]).audio
        ts = get_speech_timestamps(w, vad_options())
        wavs.append(np.concatenate([w[t["start"] : t["end"]] for t in ts]) if ts else w)
    emb, labels = voice_encoder().embed(wavs), np.array([speaker_of[u] for u in chosen])
    rng, rows = np.random.default_rng(0), []
    for thr in thresholds:
        aris, right = [], 0
        for _ in range(trials):
            pair = rng.choice(sorted(by), 2, replace=False)
            idx = rng.choice(np.flatnonzero(np.isin(labels, pair)), 8, replace=False)
            got = cluster(emb[idx], thr)
            aris.append(adjusted_rand_score(labels[idx], got))
            right += len(set(got)) == len(set(labels[idx]))
        rows.append({"threshold": thr, "ari": round(float(np.mean(aris)), 3), "count_right": round(right / trials, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--speakers", action="store_true", help="also the clustering threshold study (Emo-DB)")
    args = parser.parse_args()
    started = time.perf_counter()
    recognizer(args.device).load()
    recognizer(args.device).transcribe(np.zeros(SAMPLE_RATE, np.float32))  # VAD warm
    print(f"model load {time.perf_counter() - started:.2f} s on {args.device}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if shutil.which("espeak-ng"):
            items = espeak_items(Path(tmp))
            recognizer(args.device).transcribe(items[0][0])  # warm: speaker encoder, first decode
            results.append(run_set("espeak", items, args.device))
    if (SHARED / "media" / "cremad").is_dir():
        results.append(run_set("cremad", cremad_items(), args.device))
    print(f"{'set':8} {'items':>5} {'words':>5} {'WER':>6} {'utts':>7} {'speakers':>8} {'audio s':>8} "
          f"{'asr s':>7} {'RTF':>6}  stages")  # fmt: skip
    for r in results:
        stages = " ".join(f"{k}={v:.2f}" for k, v in r["seconds"].items() if k != "total")
        print(f"{r['set']:8} {r['items']:>5} {r['words']:>5} {r['wer']:>6.3f} "
              f"{r['utterances_found']:>3}/{r['utterances_spoken']:<3} {r['speaker_count_right']:>8} "
              f"{r['audio_s']:>8.2f} {r['seconds']['total']:>7.2f} {r['rtf']:>6.3f}  {stages}")  # fmt: skip
    report = {"device": args.device, "model": "whisper-tiny.en", "sets": results}
    if args.speakers and (SHARED / "data" / "emodb7").is_dir():
        report["speaker_threshold_study"] = speaker_study([0.25, 0.3, 0.35, 0.4, 0.45])
        for row in report["speaker_threshold_study"]:
            print(
                f"speaker clustering threshold {row['threshold']}: ARI {row['ari']}, count right {row['count_right']}"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
