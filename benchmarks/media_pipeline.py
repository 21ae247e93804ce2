"""Media feature extraction: per-stage seconds and real-time factor, ours vs the naive per-utterance pipeline.

Video: ../shared/media/WolfgangLanger_Pexels.mp4 (19.7 s, 640x360, 23.98 fps) with a transcript of
6 utterances (3.28 s each), extractors minilm-l6-v2 + compare2016 (6373-d) + mtcnn-pyemotion, one
frame in 10. The clip's audio track is digital silence, which our pipeline would mark absent and
skip; both variants are made to run openSMILE on it anyway (MERC_SILENCE_DBFS=-inf) so the audio
work is counted. Models are loaded before timing (warm); figures are medians of ``--repeats`` runs;
``cpu`` is user + system CPU seconds of the process and its ffmpeg children (less sensitive than wall
time to other load on the machine, whose 1-minute load average is printed with each row).

* ours: one decode per stream (PyAV, sampled frames scaled by swscale: 240p RGB for detection, 480p
  gray for the crops), audio cut in memory, openSMILE on a thread overlapping video decoding, MTCNN
  (facenet's networks, batched crops: service/features/mtcnn_batched.py) on 16-frame batches on a
  worker thread (also overlapping decoding), face CNN on all faces at once, text in one batch;
* naive: per utterance, ffmpeg (or PyAV, where ffmpeg is not installed: the file reopened and decoded
  again per utterance and stream) cuts a WAV and dumps every 10th frame as PNG, openSMILE reads the WAV
  file, MTCNN runs frame by frame, the face CNN face by face, the text encoder sentence by sentence.

Both make the face and voice readings (service/inference/readings.py) at equal work: ours in the same passes
(the voice reading reuses the compare2016 functionals, the face reading the face CNN's class scores of
the chosen faces); naive with a second call of the face CNN's classifier per face and the voice model on
the functionals openSMILE wrote for each WAV (normalised per speaker over the conversation at the end).

``--batch 10`` also times 10 copies of the conversation as one batch (``extract_features_many``:
one text call, one openSMILE pass, face detection batched across the files); ``--long`` builds a
10-minute 720p video (ffmpeg, cached under $TMPDIR) and prints the peak resident memory of extracting
it (60 utterances of 10 s). Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/media_pipeline.py [--threads 1] [--repeats 3] [--long]

``--device cuda`` runs both variants' models on the GPU (MTCNN and the face CNN in fp16 there, the text
encoder too); ``--video`` another clip (benchmarks/gpu_check.py passes both).

``--threads`` is torch's intra-op thread count (default 1): on a shared 2-core machine, 2 OpenMP
threads spin at a barrier after each of MTCNN's thousands of small ops while the other thread is
descheduled, which made both variants 5-20x slower under load. Our pipeline gets its parallelism
from threads instead (openSMILE, video decoding, face detection on a worker thread).
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
from service.features.visual import FaceObs, aligned_crop  # noqa: E402
from service.inference.pipeline import STAGES, MediaInput, extract_features_many  # noqa: E402

STAGE_NAMES = STAGES  # decode, text, audio, face_detection, face_cnn, readings

VIDEO = ROOT.parent / "shared" / "media" / "WolfgangLanger_Pexels.mp4"
SENTENCES = ["Hi there, how are you?", "I am so happy today!", "Really? Why?", "I got the job.",
             "That's wonderful news.", "Let's celebrate tonight."]  # fmt: skip


def transcript(duration: float, n: int = 6, cid: str = "bench") -> Conversation:
    step = duration / n
    utts = [Utterance(f"u{i}", f"s{i % 2}", SENTENCES[i % len(SENTENCES)], i * step, (i + 1) * step) for i in range(n)]
    return Conversation(cid, utts)


def spec() -> dict:
    return {"text": make_spec("text"), "audio": make_spec("audio", "compare2016"), "visual": make_spec("visual")}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children (ffmpeg)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ours(convs: list[Conversation], video: Path, feature_spec: dict, device: str = "cpu") -> dict[str, float]:
    """One :func:`extract_features_many` call over ``convs`` (each with ``video``), readings included."""
    started, cpu = time.perf_counter(), cpu_seconds()
    outs, timings = extract_features_many(convs, feature_spec, [MediaInput(video=video)] * len(convs), device)
    assert all(fs.readings is not None for fs in outs)  # readings made in the same passes
    timings["total"] = time.perf_counter() - started
    timings["cpu"] = cpu_seconds() - cpu
    return timings


def naive_cut(video: Path, start: float, end: float, wav: Path, frames: Path, every: int, side: int) -> None:
    """One utterance to files: a 16 kHz mono WAV and every ``every``-th frame as PNG at ``side`` pixels.

    With ffmpeg on the PATH, two ffmpeg processes (the classic shell pipeline); without it, the same
    with PyAV, the file opened, seeked and decoded again for each utterance and each stream."""
    if shutil.which("ffmpeg"):
        cut = ["ffmpeg", "-v", "error", "-y", "-ss", str(start), "-to", str(end), "-i", str(video)]
        subprocess.run([*cut, "-vn", "-ac", "1", "-ar", "16000", str(wav)], check=True)
        select = f"select=not(mod(n\\,{every})),scale=-2:{side}"
        subprocess.run([*cut, "-an", "-vf", select, "-vsync", "vfr", str(frames / "f%04d.png")], check=True)
        return
    import av

    with av.open(str(video)) as src, av.open(str(wav), "w") as out:
        src.seek(int(start * 1e6))
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        for frame in src.decode(audio=0):
            if frame.time is not None and frame.time >= end:
                break
            if frame.time is not None and frame.time + frame.samples / frame.sample_rate >= start:
                for piece in resampler.resample(frame):
                    out.mux(stream.encode(piece))
        out.mux(stream.encode(None))
    with av.open(str(video)) as src:
        src.seek(int(start * 1e6))
        n = 0
        for frame in src.decode(video=0):
            if frame.time is None or frame.time < start:
                continue
            if frame.time >= end:
                break
            if n % every == 0:
                img = frame.to_image()
                img.resize((round(img.width * side / img.height), side)).save(frames / f"f{n // every + 1:04d}.png")
            n += 1


def naive(conv: Conversation, video: Path, feature_spec: dict, work: Path, device: str = "cpu") -> dict[str, float]:
    """The per-utterance pipeline with files and ffmpeg subprocesses, same models and frame rate."""
    from PIL import Image

    text = extractor_for("text", feature_spec["text"], device)
    audio = extractor_for("audio", feature_spec["audio"], device)
    visual = extractor_for("visual", feature_spec["visual"], device)
    dtype = torch.float16 if visual.half else torch.float32
    from service.features.voice_reading import load_voice_model
    from service.inference.readings import face_readings, voice_readings

    voice = load_voice_model()
    t = dict.fromkeys(STAGE_NAMES, 0.0)
    started, cpu = time.perf_counter(), cpu_seconds()
    vectors, speech, faces = [], [], []
    for i, u in enumerate(conv.utterances):
        wav, frames = work / f"u{i}.wav", work / f"u{i}"
        frames.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        naive_cut(video, u.start, u.end, wav, frames, visual.options.frame_every, visual.options.short_side)
        t1 = time.perf_counter()
        vectors.append(audio.smile.process_file(str(wav)).to_numpy(np.float32).reshape(-1))
        t2 = time.perf_counter()
        text.encode([u.text], show_progress=False)
        t3 = time.perf_counter()
        detection, crops = 0.0, []
        for png in sorted(frames.glob("*.png")):  # facenet's MTCNN frame by frame, most confident face
            frame = np.asarray(Image.open(png).convert("RGB"))
            t5 = time.perf_counter()
            boxes, probs, marks = visual.facenet.detect(frame, landmarks=True)
            detection += time.perf_counter() - t5
            if boxes is not None:
                k, gray = int(np.argmax(probs)), Image.fromarray(frame).convert("L")
                crops.append((aligned_crop(gray, boxes[k], marks[k], 48), aligned_crop(gray, boxes[k], marks[k], 64)))
        chosen = []
        with torch.inference_mode():
            for crop, reading_crop in crops:  # the face CNN face by face, then the face reading's classifier
                face = torch.from_numpy(crop[None, None].astype(np.float32) / 255.0).to(visual.device, dtype)
                hidden, _ = visual.cnn(face)
                chosen.append(FaceObs(0, (0.5, 0.5), 0.0, 1.0, crop))
                if getattr(visual, "reader", None) is not None:
                    face = torch.from_numpy(reading_crop[None, None].astype(np.float32) / 255.0)
                    probs = visual.reader(face.to(visual.device, dtype))
                else:
                    probs = torch.softmax(visual.cnn.expression_logits(hidden).float(), 1)
                chosen[-1].expression = probs.cpu().numpy()[0]
        t4 = time.perf_counter()
        faces.append(face_readings([chosen], [len(crops)])[0])
        speech.append(u.end - u.start)
        t["decode"] += t1 - t0
        t["audio"] += t2 - t1
        t["text"] += t3 - t2
        t["face_detection"] += detection
        t["face_cnn"] += t4 - t3 - detection
    t5 = time.perf_counter()
    voice_readings(voice, vectors, [u.speaker for u in conv.utterances], speech)
    t["readings"] = time.perf_counter() - t5
    t["total"] = time.perf_counter() - started
    t["cpu"] = cpu_seconds() - cpu
    return t


def report(name: str, runs: list[dict[str, float]], media_seconds: float) -> dict[str, float]:
    """Print the medians of ``runs`` (wall seconds per stage, total, RTF, CPU seconds) and return them."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    stages = " ".join(f"{k}={med[k]:.3f}" for k in STAGE_NAMES)
    rtf = med["total"] / media_seconds
    print(
        f"{name:<28} total={med['total']:.3f}s RTF={rtf:.3f} cpu={med['cpu']:.2f}s load={os.getloadavg()[0]:.2f}"
        f"  [{stages}]",
        flush=True,
    )
    return med


def media_seconds(video: Path) -> float:
    """The clip's duration in seconds (the container's)."""
    import av

    with av.open(str(video)) as container:
        return container.duration / 1e6 if container.duration else 19.69


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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--long", action="store_true", help="only the 10-minute 720p peak-memory run")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (models of both variants)")
    ap.add_argument("--video", type=Path, default=VIDEO, help="the clip (default: the 19.7 s face video)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    video, device = args.video, args.device
    if not video.is_file():
        sys.exit(f"{video} not found (needs ../shared/media)")
    feature_spec = spec()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.long:
            timings = ours([transcript(600.0, n=60, cid="long")], long_video(work), feature_spec, device)
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rtf = timings["total"] / 600
            print(f"10-min 720p: total={timings['total']:.1f}s RTF={rtf:.3f} peak RSS={peak_mb:.0f} MB {timings}")
            return
        seconds = media_seconds(video)
        conv = [transcript(seconds)]
        ours(conv, video, feature_spec, device)  # warm-up: models loaded, caches primed
        print(f"threads={args.threads} cores={os.cpu_count()} load={os.getloadavg()[0]:.2f} video={seconds:.2f}s "
              f"device={device}")  # fmt: skip
        runs = [ours(conv, video, feature_spec, device) for _ in range(args.repeats)]
        mine = report("ours (1 conversation)", runs, seconds)
        if not args.no_naive:
            naive(conv[0], video, feature_spec, work, device)
            runs = [naive(conv[0], video, feature_spec, work, device) for _ in range(args.repeats)]
            peer = report("naive (1 conversation)", runs, seconds)
            print(f"speed-up vs naive: {peer['total'] / mine['total']:.2f}x wall, {peer['cpu'] / mine['cpu']:.2f}x CPU")
        if args.batch > 1:
            copies = [transcript(seconds, cid=f"c{k}") for k in range(args.batch)]
            runs = [ours(copies, video, feature_spec, device) for _ in range(max(1, args.repeats // 2))]
            report(f"ours ({args.batch} conversations, 1 batch)", runs, seconds * args.batch)


if __name__ == "__main__":
    main()
