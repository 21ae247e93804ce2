"""Jobs per minute through the distributed deployment with one, then two, CPU workers.

Starts what docker-compose.yml runs, as local processes (``tests.local_cluster``): a
real redis-server, ``merc serve`` with MERC_QUEUE set, and ``merc worker`` processes on the
CPU. Submits the same workload twice: text conversations plus media uploads (a video with
sound when ``--video`` exists, else a generated WAV), every job through the REST API and
the Redis queue; times from the first POST until the last job finished. Run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/workers_throughput.py [--jobs 16] [--utterances 200]

Each worker uses one torch thread; on a machine with fewer free cores than workers, the
second worker has no core of its own and the speed-up shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.local_cluster import ROOT, LocalCluster, sample_conversation, sample_wav

DEFAULT_VIDEO = ROOT.parent / "shared" / "media" / "WolfgangLanger_Pexels.mp4"


def media_part(video: Path | None) -> tuple[str, tuple[str, bytes, str], float]:
    """(form field, file tuple, duration in s) of the media upload."""
    if video is not None and video.exists():
        import av

        with av.open(str(video)) as c:
            duration = c.duration / 1e6
        return "video", (video.name, video.read_bytes(), "video/mp4"), duration
    return "audio", ("talk.wav", sample_wav(10.0), "audio/wav"), 10.0


def submit(client: httpx.Client, i: int, args: argparse.Namespace, media: tuple) -> str:
    """Job ``i`` of the workload: every ``media_every``-th one a media upload, the rest text.

    Texts are new in every job (a random tag), so no job is served from the embedding cache.
    """
    tag = f"{uuid.uuid4().hex[:8]}-"
    if args.media_every and i % args.media_every == args.media_every - 1:
        field, file, duration = media
        transcript = json.dumps(sample_conversation(args.utterances, span_s=duration * 0.95, tag=tag))
        r = client.post("/v1/conversations", params={"wait": 0}, files={field: file, "transcript": (None, transcript)})
    else:
        r = client.post("/v1/conversations", params={"wait": 0}, json=sample_conversation(args.utterances, tag=tag))
    r.raise_for_status()
    return r.json()["id"]


def run_workload(client: httpx.Client, args: argparse.Namespace, media: tuple) -> dict:
    """Submit ``args.jobs`` jobs at once; jobs per minute from first POST to last finish."""
    started = time.perf_counter()
    ids = [submit(client, i, args, media) for i in range(args.jobs)]
    failed = 0
    while ids:  # jobs finish roughly in order: poll the oldest unfinished one, lightly
        status = client.get(f"/v1/conversations/{ids[0]}").json()["status"]
        if status in ("succeeded", "failed"):
            failed += status == "failed"
            ids.pop(0)
        else:
            time.sleep(0.1)
    seconds = time.perf_counter() - started
    return {"jobs": args.jobs, "failed": failed, "seconds": round(seconds, 2), "jobs_per_min": args.jobs * 60 / seconds}


def measure(base: Path, args: argparse.Namespace, media: tuple, env: dict[str, str]) -> list[dict]:
    """The workload with one worker, then again after a second worker joined."""
    rows = []
    with LocalCluster(base, workers=1, **env) as c, httpx.Client(base_url=c.api_url, timeout=60) as client:
        for n_workers in (1, 2):
            if n_workers == 2:
                c.start_worker()
            run_workload(client, argparse.Namespace(**{**vars(args), "jobs": 2 * n_workers}), media)  # warm-up
            rows.append({"workers": n_workers, **run_workload(client, args, media)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs per measurement")
    parser.add_argument("--utterances", type=int, default=200, help="utterances per conversation")
    parser.add_argument("--media-every", type=int, default=4, help="every Nth job uploads media (0: text only)")
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="video with sound [generated WAV if absent]")
    parser.add_argument("--model", default="sdt-meld7", help="bundle every job names (MiniLM text encoder)")
    args = parser.parse_args()
    media = media_part(args.video)
    env = {"MERC_MAX_QUEUE": str(args.jobs + 10), "MERC_DEFAULT_MODEL": args.model}
    with tempfile.TemporaryDirectory(prefix="merc-bench-") as tmp:
        rows = measure(Path(tmp), args, media, env)
    print(f"workload: {args.jobs} jobs of {args.utterances} utterances, media ({media[0]}) every {args.media_every}")
    print(f"model: {args.model}")
    print(f"cpu cores: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, 1 torch thread/worker")
    print(f"{'workers':>7} {'jobs':>5} {'failed':>6} {'seconds':>8} {'jobs/min':>9}")
    for r in rows:
        print(f"{r['workers']:>7} {r['jobs']:>5} {r['failed']:>6} {r['seconds']:>8.2f} {r['jobs_per_min']:>9.1f}")
    speedup = rows[1]["jobs_per_min"] / rows[0]["jobs_per_min"]
    print(json.dumps({"rows": rows, "speedup": round(speedup, 2)}))


if __name__ == "__main__":
    main()
