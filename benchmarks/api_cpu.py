"""REST API on CPU: latency, throughput and memory of a real ``merc serve`` process.

Prints, for the default bundle:

* p50/p99 latency of POST /v1/conversations with a 20-utterance text conversation (?wait, so
  the answer carries the result), every request with new sentences (no embedding-cache hits);
* p50/p99 latency of appending one utterance (POST /v1/conversations/{id}/utterances);
* requests per second with 16 concurrent clients (or each of ``--clients-list``), their p50/p99 latency,
  and the error count (must be 0); the same for chat traffic (``concurrent_appends``: each client
  appends one turn at a time to its own 20-turn conversation);
* the resident memory of the server and its children (the inference runner) after 10 requests
  and after 1000 (chatbot sessions of 20 turns
  plus 10 appended ones; a single conversation growing to hundreds of utterances costs more
  memory per request, as attention over it grows).

Run (about 5 minutes on 2 busy cores)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/api_cpu.py [--threads 1] [--n 50] [--model NAME]
        [--clients-list 1,4,16] [--per-client 8] [--total 1000] [--workers 1] [--batch-max 16]

Concurrent requests are micro-batched by the job runner (``MERC_BATCH_MAX``, ``MERC_BATCH_WAIT_MS``):
``--batch-max 1`` times the runner without it; ``--workers 2`` runs two inference children.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.settings import Settings
from tests.api.conftest import Server

WORDS = [
    "i",
    "you",
    "we",
    "they",
    "really",
    "never",
    "always",
    "maybe",
    "love",
    "hate",
    "want",
    "need",
    "think",
    "feel",
    "know",
    "said",
    "told",
    "great",
    "terrible",
    "happy",
    "sad",
    "angry",
    "scared",
    "sorry",
    "today",
    "tomorrow",
    "again",
    "house",
    "work",
    "money",
    "friend",
    "party",
    "news",
]


class Load:
    """Makes requests with fresh sentences and counts them."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.rng = random.Random(0)
        self.count = 0
        self.sentences = 0
        self.errors: list[str] = []

    def sentence(self) -> str:
        self.sentences += 1
        return " ".join(self.rng.choice(WORDS) for _ in range(10)) + f" #{self.sentences}"

    def conversation(self, n: int = 20) -> dict:
        utts = [{"speaker": "AB"[i % 2], "text": self.sentence()} for i in range(n)]
        return {"model": self.model, "utterances": utts}

    def call(self, client: httpx.Client, path: str, body: dict) -> tuple[float, dict | None]:
        started = time.perf_counter()
        r = client.post(path, json=body, params={"wait": 60} if path == "/v1/conversations" else None)
        elapsed = time.perf_counter() - started
        self.count += 1
        if r.status_code != 200:
            self.errors.append(f"{r.status_code} {r.text[:200]}")
            return elapsed, None
        return elapsed, r.json()


def rss_mb(proc: psutil.Process) -> float:
    """Resident MB of the server and its child processes (the inference runner is a spawned child)."""
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


def rss_by_process(proc: psutil.Process) -> dict[str, float]:
    """Resident MB per process of the server's tree (pid: MB)."""
    return {
        f"{p.pid} {'server' if p.pid == proc.pid else 'child'}": round(p.memory_info().rss / 2**20, 1)
        for p in [proc, *proc.children(recursive=True)]
    }


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def concurrent_rps(load: Load, clients: int, total: int) -> dict[str, float]:
    bodies = [load.conversation() for _ in range(total)]
    pool = [httpx.Client(base_url=load.url, timeout=120) for _ in range(clients)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        futures = [ex.submit(load.call, pool[i % clients], "/v1/conversations", b) for i, b in enumerate(bodies)]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - started
    for c in pool:
        c.close()
    ok = sum(1 for _, body in results if body and body["status"] == "succeeded")
    latency = percentiles([elapsed for elapsed, _ in results])
    return {"clients": clients, "requests": total, "rps": round(total / wall, 2), "errors": total - ok} | latency


def concurrent_appends(load: Load, clients: int, total: int) -> dict[str, float]:
    """Chat traffic: one 20-turn conversation per client, then ``total`` appends of one turn, each client
    appending to its own conversation one turn at a time (as a chatbot backend would)."""
    pool = [httpx.Client(base_url=load.url, timeout=120) for _ in range(clients)]
    ids = [(load.call(pool[0], "/v1/conversations", load.conversation())[1] or {}).get("id") for _ in range(clients)]

    def chat(i: int, turns: int) -> list[tuple[float, dict | None]]:
        path = f"/v1/conversations/{ids[i]}/utterances"
        return [
            load.call(pool[i], path, {"utterances": [{"speaker": "A", "text": load.sentence()}]}) for _ in range(turns)
        ]

    per = max(1, total // clients)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        results = [r for f in [ex.submit(chat, i, per) for i in range(clients)] for r in f.result()]
    wall = time.perf_counter() - started
    for c in pool:
        c.close()
    ok = sum(1 for _, body in results if body and body.get("utterances"))
    latency = percentiles([elapsed for elapsed, _ in results])
    return (
        {"clients": clients, "appends": len(results), "rps": round(len(results) / wall, 2)}
        | latency
        | {"errors": len(results) - ok}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="bundle to time [the service default, MERC_DEFAULT_MODEL]")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    ap.add_argument("--workers", type=int, default=1, help="in-process worker threads (MERC_WORKERS), a child each")
    ap.add_argument("--batch-max", type=int, default=None, help="MERC_BATCH_MAX (1: no micro-batching) [settings]")
    ap.add_argument("--n", type=int, default=50, help="requests per latency figure")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument(
        "--clients-list", default=None, help="e.g. 1,4,16: requests/s and p50/p99 at each (overrides --clients)"
    )
    ap.add_argument("--per-client", type=int, default=8, help="concurrent requests per client (at least 32 in all)")
    ap.add_argument("--total", type=int, default=1000, help="requests before the last memory reading")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="merc-bench-"))
    (tmp / "data").mkdir()
    args.model = args.model or Settings().default_model
    env = {"MERC_DEFAULT_MODEL": args.model, "MERC_TORCH_THREADS": str(args.threads), "OMP_NUM_THREADS": "1"}
    env["MERC_WORKERS"] = str(args.workers)
    if args.batch_max is not None:
        env["MERC_BATCH_MAX"] = str(args.batch_max)
    server = Server(tmp / "data", tmp / "cache", **env).start()
    proc = psutil.Process(server.proc.pid)
    load = Load(server.url, args.model)
    out: dict = {"model": args.model, "torch_threads": args.threads, "workers": args.workers}
    out["cpus"] = psutil.cpu_count()
    out["batch_max"] = args.batch_max or Settings().batch_max
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            bundle = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == args.model)
            out["text_extractor"] = bundle["feature_spec"].get("text", {}).get("extractor")
            for _ in range(10):
                load.call(client, "/v1/conversations", load.conversation())
            out["rss_mb_after_10"] = rss_mb(proc)
            post = [load.call(client, "/v1/conversations", load.conversation())[0] for _ in range(args.n)]
            out["post_20_utterances"] = percentiles(post)
            job = load.call(client, "/v1/conversations", load.conversation())[1]
            path = f"/v1/conversations/{job['id']}/utterances"
            turn = [
                load.call(client, path, {"utterances": [{"speaker": "A", "text": load.sentence()}]})[0]
                for _ in range(args.n)
            ]
            out["append_1_utterance"] = percentiles(turn) | {"context": f"20 -> {20 + args.n} utterances"}
        levels = [int(c) for c in args.clients_list.split(",")] if args.clients_list else [args.clients]
        out["concurrent"] = [concurrent_rps(load, c, max(args.per_client * c, 32)) for c in levels]
        out["concurrent_appends"] = [concurrent_appends(load, c, max(args.per_client * c, 32)) for c in levels]
        with httpx.Client(base_url=server.url, timeout=120) as client:
            curve = {}
            while load.count < args.total:  # chatbot sessions: 20 turns, then 10 appended ones
                if load.count % 250 == 0:
                    curve[load.count] = rss_mb(proc)
                if load.count % 11 == 0:
                    job = load.call(client, "/v1/conversations", load.conversation())[1]
                    path = f"/v1/conversations/{job['id'] if job else ''}/utterances"
                else:
                    load.call(client, path, {"utterances": [{"speaker": "B", "text": load.sentence()}]})
        out["requests_total"] = load.count
        out["rss_mb_after_total"] = rss_mb(proc)
        out["rss_mb_by_requests"] = curve
        out["rss_mb_by_process"] = rss_by_process(proc)
        out["errors_total"] = len(load.errors)
    finally:
        server.stop()
    print(json.dumps(out, indent=2))
    if load.errors:
        print("errors:", *load.errors[:5], sep="\n", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
