"""Media feature extraction: per-stage seconds and real-time factor, ours vs the naive per-utterance pipeline.

Video: ../shared/media/WolfgangLanger_Pexels.mp4 (19.7 s, 640x360, 23.98 fps) with a transcript of
6 utterances (3.28 s each), extractors minilm-l6-v2 + compare2016 (6373-d) + mtcnn-pyemotion, one
frame in 10. The clip's audio track is digital silence, which our pipeline would mark absent and
skip; both variants are made to run openSMILE on it anyway (MERC_SILENCE_DBFS=-inf) so the audio
work is counted. Models are loaded before timing (warm); figures are medians of ``--repeats`` runs.

* ours: one decode per stream (PyAV), audio cut in memory, openSMILE on a thread overlapping video
  decoding, MTCNN on frame batches, face CNN on all faces at once, text in one batch;
* naive: per utterance, ffmpeg cuts a WAV and dumps every 10th frame as PNG, openSMILE reads the WAV
  file, MTCNN runs frame by frame, the face CNN face by face, the text encoder sentence by sentence.

``--batch 10`` also times 10 copies of the conversation in one call sequence; ``--long`` builds a
10-minute 720p video (ffmpeg, cached under $TMPDIR) and prints the peak resident memory of extracting
it (60 utterances of 10 s). Run::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/media_pipeline.py [--threads 2] [--repeats 3] [--long]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MERC_SILENCE_DBFS", "-inf")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.data import Conversation, Utterance  # noqa: E402
from service.features.registry import extractor_for, make_spec  # noqa: E402
from service.pipeline import MediaInput, extract_features  # noqa: E402

VIDEO = ROOT.parent / "shared" / "media" / "WolfgangLanger_Pexels.mp4"
SENTENCES = ["Hi there, how are you?", "I am so happy today!", "Really? Why?", "I got the job.",
             "That's wonderful news.", "Let's celebrate tonight."]  # fmt: skip


def transcript(duration: float, n: int = 6, cid: str = "bench") -> Conversation:
    step = duration / n
    utts = [Utterance(f"u{i}", f"s{i % 2}", SENTENCES[i % len(SENTENCES)], i * step, (i + 1) * step) for i in range(n)]
    return Conversation(cid, utts)


def spec() -> dict:
    return {"text": make_spec("text"), "audio": make_spec("audio", "compare2016"), "visual": make_spec("visual")}


def ours(conv: Conversation, video: Path, feature_spec: dict) -> dict[str, float]:
    started = time.perf_counter()
    _, timings = extract_features(conv, feature_spec, MediaInput(video=video), "cpu")
    timings["total"] = time.perf_counter() - started
    return timings


def naive(conv: Conversation, video: Path, feature_spec: dict, work: Path) -> dict[str, float]:
    """The per-utterance pipeline with files and ffmpeg subprocesses, same models and frame rate."""
    from PIL import Image

    text = extractor_for("text", feature_spec["text"], "cpu")
    audio = extractor_for("audio", feature_spec["audio"], "cpu")
    visual = extractor_for("visual", feature_spec["visual"], "cpu")
    t = dict.fromkeys(("decode", "text", "audio", "face_detection", "face_cnn"), 0.0)
    started = time.perf_counter()
    for i, u in enumerate(conv.utterances):
        wav, frames = work / f"u{i}.wav", work / f"u{i}"
        frames.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        cut = ["ffmpeg", "-v", "error", "-y", "-ss", str(u.start), "-to", str(u.end), "-i", str(video)]
        subprocess.run([*cut, "-vn", "-ac", "1", "-ar", "16000", str(wav)], check=True)
        every = visual.options.frame_every
        select = f"select=not(mod(n\\,{every})),scale=-2:{visual.options.short_side}"
        subprocess.run([*cut, "-an", "-vf", select, "-vsync", "vfr", str(frames / "f%04d.png")], check=True)
        t1 = time.perf_counter()
        audio.smile.process_file(str(wav))
        t2 = time.perf_counter()
        text.encode([u.text], show_progress=False)
        t3 = time.perf_counter()
        session = visual.session(1)
        for png in sorted(frames.glob("*.png")):
            session(np.asarray(Image.open(png).convert("RGB"))[None], [[0]])
        with torch.inference_mode():
            for faces in session.faces[0]:
                if faces:
                    visual.cnn(torch.from_numpy(faces[0].crop[None, None]))
        t4 = time.perf_counter()
        t["decode"] += t1 - t0
        t["audio"] += t2 - t1
        t["text"] += t3 - t2
        t["face_detection"] += session.detection_seconds
        t["face_cnn"] += t4 - t3 - session.detection_seconds
    t["total"] = time.perf_counter() - started
    return t


def report(name: str, runs: list[dict[str, float]], media_seconds: float) -> None:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    stages = " ".join(f"{k}={med[k]:.3f}" for k in ("decode", "text", "audio", "face_detection", "face_cnn"))
    print(f"{name:<28} total={med['total']:.3f}s RTF={med['total'] / media_seconds:.3f}  [{stages}]", flush=True)


def long_video(work: Path) -> Path:
    """10 minutes of 1280x720 (the benchmark clip looped and upscaled), cached across runs."""
    path = Path(tempfile.gettempdir()) / "merc-bench-10min-720p.mp4"
    if not path.exists():
        loop = ["ffmpeg", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(VIDEO), "-t", "600"]
        opts = ["-vf", "scale=1280:720", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(work / "l.mp4")]
        subprocess.run(loop + opts, check=True)
        shutil.move(work / "l.mp4", path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--long", action="store_true", help="only the 10-minute 720p peak-memory run")
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not VIDEO.is_file():
        sys.exit(f"{VIDEO} not found (needs ../shared/media)")
    feature_spec = spec()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.long:
            video = long_video(work)
            conv = transcript(600.0, n=60, cid="long")
            timings = ours(conv, video, feature_spec)
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rtf = timings["total"] / 600
            print(f"10-min 720p: total={timings['total']:.1f}s RTF={rtf:.3f} peak RSS={peak_mb:.0f} MB {timings}")
            return
        conv = transcript(19.69)
        ours(conv, VIDEO, feature_spec)  # warm-up: models loaded, caches primed
        print(f"threads={args.threads} cores={os.cpu_count()} load={os.getloadavg()[0]:.2f} video=19.69s")
        report("ours (1 conversation)", [ours(conv, VIDEO, feature_spec) for _ in range(args.repeats)], 19.69)
        if not args.no_naive:
            naive(conv, VIDEO, feature_spec, work)
            runs = [naive(conv, VIDEO, feature_spec, work) for _ in range(args.repeats)]
            report("naive (1 conversation)", runs, 19.69)
        copies = [transcript(19.69, cid=f"c{k}") for k in range(args.batch)]
        runs = []
        for _ in range(max(1, args.repeats // 2)):
            per = [ours(c, VIDEO, feature_spec) for c in copies]
            runs.append({k: sum(p[k] for p in per) for k in per[0]})
        report(f"ours ({args.batch} conversations)", runs, 19.69 * args.batch)


if __name__ == "__main__":
    main()
