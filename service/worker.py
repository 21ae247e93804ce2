"""Job processing, independent of the web framework.

``process_job(job_id)`` is the whole unit of work: it reads the job's inputs from the data
directory (``jobs/<id>/request.json`` and media), extracts features, runs the bundle, and
stores the result (or a problem+json error) in the job store. The in-process worker of
``merc serve`` is a few threads calling it; a Celery task (issue #5) can call the same
function with the id it receives from the broker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.data import Conversation, parse_conversation
from service import metrics
from service.callbacks import callback_problem
from service.datasets import INLINE
from service.features.registry import extractor_for
from service.pipeline import MediaInput, extract_features, supplied_modalities
from service.pipeline import score as pipeline_score
from service.predictor import FeatureLists, Predictor
from service.settings import Settings, get_settings
from service.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore

log = logging.getLogger("merc.worker")

_PREDICTORS: dict[str, Predictor] = {}
_PREDICTOR_LOCK = threading.Lock()
FINISH_HOOKS: list[Callable[[str], None]] = []  # called with the job id when a job of this process ends
_CONV_LOCKS = [threading.Lock() for _ in range(64)]  # appends to one conversation run one at a time


class JobInputError(ValueError):
    """A job whose stored inputs cannot be processed (reported as the job's error)."""


def get_predictor(name: str, settings: Settings | None = None) -> Predictor:
    """The bundle ``name`` loaded once per process."""
    settings = settings or get_settings()
    with _PREDICTOR_LOCK:
        if name not in _PREDICTORS:
            started = time.perf_counter()
            _PREDICTORS[name] = Predictor(name, device=settings.device, weights_dir=settings.weights_dir)
            metrics.STAGE_SECONDS.labels("load_model").observe(time.perf_counter() - started)
        return _PREDICTORS[name]


def warm_up(predictor: Predictor, settings: Settings) -> None:
    """Load the extractors a bundle's feature spec names now, not on the first request."""
    for m, entry in predictor.feature_spec.items():
        if entry["version"] == INLINE:
            continue
        try:
            extractor = extractor_for(m, entry, settings.device)
        except ValueError as e:  # a spec this host cannot satisfy: jobs will report it per modality
            log.warning("bundle %s: %s", predictor.name, e)
            continue
        if hasattr(extractor, "load"):
            extractor.load()


def loaded_models() -> list[str]:
    return sorted(_PREDICTORS)


# ---------------------------------------------------------------- features and scoring


def extract(predictor: Predictor, conv: Conversation, media: MediaInput, device: str) -> tuple[FeatureLists, dict]:
    """Features for ``conv`` per the bundle's spec, and seconds per stage."""
    return extract_features(conv, predictor.feature_spec, media if media.video or media.audio else None, device)


def score(predictor: Predictor, conv: Conversation, features: FeatureLists, media: MediaInput, timings: dict) -> dict:
    """The result document (see service.pipeline.score); stage seconds go to the metrics."""
    result = pipeline_score(predictor, conv, features, supplied_modalities(conv, media), timings)
    for stage, seconds in result["timings"].items():
        if seconds > 0:  # stages that did not run this time (no media) are not observed
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
    return result


def save_features(path: Path, features: FeatureLists, n: int) -> None:
    """modality -> (n, D) float32 plus a presence mask, in one npz (atomically replaced)."""
    arrays = {}
    for m, vectors in features.items():
        dim = next((len(v) for v in vectors if v is not None), 0)
        arr = np.zeros((n, dim), dtype=np.float32)
        present = np.zeros(n, dtype=bool)
        for i, v in enumerate(vectors):
            if v is not None:
                arr[i], present[i] = v, True
        arrays[m], arrays[f"{m}__present"] = arr, present
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_features(path: Path) -> FeatureLists:
    with np.load(path) as data:
        names = [k for k in data.files if not k.endswith("__present")]
        return {m: [row if ok else None for row, ok in zip(data[m], data[f"{m}__present"], strict=True)] for m in names}


# ---------------------------------------------------------------- jobs


def read_request(job_dir: Path) -> tuple[dict[str, Any], Conversation, MediaInput]:
    """The stored request, its conversation, and its media paths."""
    try:
        request = json.loads((job_dir / "request.json").read_text())
    except (OSError, ValueError) as e:
        raise JobInputError(f"job inputs are missing or unreadable ({e})") from None
    conv = parse_conversation(request["conversation"], "transcript")
    desc = request.get("media") or {}
    media = MediaInput(
        video=job_dir / desc["video"]["file"] if "video" in desc else None,
        audio=job_dir / desc["audio"]["file"] if "audio" in desc else None,
        video_has_audio=bool(desc.get("video", {}).get("has_audio")),
    )
    return request, conv, media


def process_job(job_id: str, store: JobStore | None = None, settings: Settings | None = None) -> str | None:
    """Run one queued job to completion; returns its final status (None if it was not queued).

    Every failure ends as status ``failed`` with a problem+json ``error``; nothing is left running.
    """
    settings = settings or get_settings()
    store = store or JobStore(settings.data_dir)
    if not store.start(job_id):
        return None
    started = time.perf_counter()
    try:
        result = _run(store, job_id, settings)
        if time.perf_counter() - started > settings.job_timeout_s:
            raise TimeoutError(f"the job took longer than the {settings.job_timeout_s:g} s limit")
        error = None
    except Exception as e:  # any failure must end the job, with its reason
        log.warning("job %s failed: %s", job_id, e, exc_info=not isinstance(e, (ValueError, TimeoutError)))
        result, error = None, _job_problem(e)
    store.finish(job_id, result=result, error=error)
    status = FAILED if error else SUCCEEDED
    metrics.JOBS.labels(status).inc()
    metrics.JOB_SECONDS.observe(time.perf_counter() - started)
    for hook in FINISH_HOOKS:
        hook(job_id)
    job = store.get(job_id)
    if job and job.get("callback_url"):
        args = (job["callback_url"], job, settings.callback_timeout_s, settings.callback_allow_private)
        threading.Thread(target=send_callback, args=args, name="merc-callback", daemon=True).start()
    return status


def _run(store: JobStore, job_id: str, settings: Settings) -> dict:
    job = store.get(job_id)
    if job is None:
        raise JobInputError("the job was deleted")
    job_dir = store.job_dir(job_id)
    _, conv, media = read_request(job_dir)
    predictor = get_predictor(job["model"], settings)
    features, timings = extract(predictor, conv, media, settings.device)
    result = score(predictor, conv, features, media, timings)
    if job_dir.is_dir():
        save_features(job_dir / "features.npz", features, len(conv.utterances))
    return result


def _job_problem(e: Exception) -> dict[str, Any]:
    kind = "timeout" if isinstance(e, TimeoutError) else "invalid-input" if isinstance(e, ValueError) else "internal"
    titles = {"timeout": "Job took too long", "invalid-input": "Inputs could not be processed"}
    return {
        "type": f"urn:merc:problem:job-{kind}",
        "title": titles.get(kind, "Job failed"),
        "detail": f"{type(e).__name__}: {e}" if kind == "internal" else str(e),
    }


def send_callback(url: str, job: dict[str, Any], timeout: float, allow_private: bool = False) -> None:
    """POST the finished job to its callback URL (best effort: failures are logged and counted).

    The host is checked again here (see service.callbacks): it may resolve differently now."""
    import httpx

    reason = callback_problem(url, allow_private)
    if reason:
        log.warning("callback for job %s not sent: %s", job["id"], reason)
        metrics.CALLBACKS.labels("refused").inc()
        return
    body = {k: job[k] for k in ("id", "status", "model", "result", "error")}
    try:
        httpx.post(url, json=body, timeout=timeout).raise_for_status()
        metrics.CALLBACKS.labels("ok").inc()
    except httpx.HTTPError as e:
        log.warning("callback %s for job %s failed: %s", url, job["id"], e)
        metrics.CALLBACKS.labels("failed").inc()


# ---------------------------------------------------------------- appended turns


def append_utterances(store: JobStore, job_id: str, new: Conversation, settings: Settings) -> dict[str, Any]:
    """Score ``new`` utterances in the context of a finished conversation, reusing its stored features.

    Only the new turns' features are computed (text, inline vectors); media-derived
    modalities are absent for them. Returns the updated result with only the new utterances.
    """
    with _CONV_LOCKS[hash(job_id) % len(_CONV_LOCKS)]:
        job = store.get(job_id)
        if job is None or job["status"] != SUCCEEDED:
            raise LookupError(job["status"] if job else "gone")
        job_dir = store.job_dir(job_id)
        request, conv, media = read_request(job_dir)
        predictor = get_predictor(job["model"], settings)
        old = load_features(job_dir / "features.npz")
        fresh, timings = extract(predictor, new, MediaInput(), settings.device)
        n_old, n_new = len(conv.utterances), len(new.utterances)
        features = {m: old.get(m, [None] * n_old) + fresh.get(m, [None] * n_new) for m in predictor.modalities}
        conv.utterances.extend(new.utterances)
        result = score(predictor, conv, features, media, timings)
        request["conversation"]["utterances"].extend(_utterance_dicts(new, n_old))
        _write_json(job_dir / "request.json", request)
        save_features(job_dir / "features.npz", features, len(conv.utterances))
        if not store.update_result(job_id, result, len(conv.utterances)):
            raise LookupError("gone")
        return {**result, "utterances": result["utterances"][n_old:]}


def _utterance_dicts(conv: Conversation, offset: int) -> list[dict[str, Any]]:
    out = []
    for i, u in enumerate(conv.utterances):
        d = {"id": u.id or f"utt{offset + i}", "speaker": u.speaker, "text": u.text, "start": u.start, "end": u.end}
        if u.features:
            d["features"] = u.features
        out.append(d)
    return out


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# ---------------------------------------------------------------- the in-process worker


class InProcessWorker:
    """Threads that take queued jobs from the store and run ``process_job`` on them."""

    def __init__(self, store: JobStore, settings: Settings, threads: int = 1) -> None:
        self.store, self.settings, self.n_threads = store, settings, threads
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.heartbeat = time.monotonic()

    def start(self) -> None:
        for i in range(self.n_threads):
            t = threading.Thread(target=self._loop, name=f"merc-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def notify(self) -> None:
        """A job was queued: wake an idle thread now instead of at its next poll."""
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                job_id = self.store.next_queued()
                if job_id is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                process_job(job_id, self.store, self.settings)
            except Exception:  # the loop must survive a broken store read
                log.exception("worker loop error")
                time.sleep(0.5)


__all__ = ["FAILED", "QUEUED", "RUNNING", "SUCCEEDED", "InProcessWorker", "append_utterances", "process_job"]
