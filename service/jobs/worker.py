"""Job lifecycle, independent of the web framework: the job runner.

``process_job(job_id)`` is the whole unit of work: it moves the job queued -> running, runs
its inference in a killable child process (``service.jobs.sandbox``; ``service.jobs.runner`` does
the work), stops it at ``MERC_JOB_TIMEOUT_S``, and stores the result or a problem+json error.
Two kinds of job exist:

* a conversation (``kind`` text or media): ``jobs/<id>/request.json`` and media -> result;
* an append (``kind`` append): new turns for a succeeded conversation. Under the
  conversation's lease (``store.lock``, across processes and hosts) the runner assigns
  default ids, checks duplicates and the utterance limit, scores the grown conversation
  reusing the stored features, writes its files, and swaps the result in with a
  compare-and-set on the utterance count. The append job's own result is the new turns.

The in-process worker of ``merc serve`` is a few threads calling it; the Celery task of
``merc worker`` calls the same function. This module never imports torch.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import metrics
from service.jobs.callbacks import callback_body
from service.jobs.files import read_json, save_features, write_json
from service.jobs.sandbox import ChildDied, ChildRunner, JobTimeout, RemoteError
from service.jobs.store import FAILED, QUEUED, RUNNING, SUCCEEDED, Busy, JobStore
from service.settings import Settings, get_settings

log = logging.getLogger("merc.worker")

FINISH_HOOKS: list[Callable[[str], None]] = []  # called with the job id when a job of this process ends
APPEND = "append"
_RUNNERS: dict[int, ChildRunner] = {}
_RUNNERS_LOCK = threading.Lock()
_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/'\"():,]+){2,}")


class JobProblem(Exception):
    """A job that ends failed with this problem (``status``: the HTTP status an API answers with)."""

    def __init__(self, status: int, slug: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail, self.field = status, slug, detail, field

    def body(self) -> dict[str, Any]:
        out = {"type": f"urn:merc:problem:{self.slug}", "title": _TITLES.get(self.slug, "Job failed")}
        out |= {"status": self.status, "detail": self.detail}
        if self.field:
            out["field"] = self.field
            out["pointer"] = "/" + self.field.replace("[", "/").replace("]", "").replace(".", "/")
        return out


_TITLES = {
    "job-timeout": "Job took too long",
    "job-invalid-input": "Inputs could not be processed",
    "job-internal": "Job failed",
    "unknown-conversation": "Not found",
    "not-finished": "Conflict",
    "conversation-busy": "Conflict",
    "duplicate-id": "Unprocessable content",
    "too-many-utterances": "Unprocessable content",
}


def default_runner(settings: Settings) -> ChildRunner:
    """The inference child of the calling thread (one per worker thread, started on first use)."""
    key = threading.get_ident()
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None or runner.settings is not settings:
            if runner is not None:
                runner.kill()
            runner = _RUNNERS[key] = ChildRunner(settings)
        return runner


def redact(text: str) -> str:
    """``text`` with file system paths reduced to their last component (no server layout in errors)."""
    return _PATHS.sub(lambda m: m.group(0).rsplit("/", 1)[-1], text)


# ---------------------------------------------------------------- one job


def process_job(
    job_id: str, store: JobStore | None = None, settings: Settings | None = None, runner: ChildRunner | None = None
) -> str | None:
    """Run one queued job to completion; returns its final status (None if it was not queued).

    Every failure ends as status ``failed`` with a problem+json ``error``; nothing is left running.
    """
    settings = settings or get_settings()
    store = store or JobStore(settings.data_dir)
    runner = runner or default_runner(settings)
    if not runner.alive():  # a fresh child (first job, or after a timeout): models load off the job's clock
        runner.preload()
    if not store.start(job_id):
        return None
    return _process_started(job_id, store, settings, runner)


def process_batch(
    first: str | None, store: JobStore, settings: Settings, runner: ChildRunner | None = None
) -> list[tuple[str, str | None]]:
    """Micro-batching: claim ``first`` (None: the oldest queued job) and up to ``batch_max - 1`` more queued
    jobs, waiting at most ``batch_wait_ms`` for them when the runner's previous batch held several
    (under load; a lone request never waits); encode all their text in one call in the child
    (``runner.prefetch_text``), then run each job as :func:`process_job` does. Returns ``(id, status)``
    per job claimed (status None: ``first`` was not queued). A media job is never claimed behind
    another one (its seconds of decoding would hold the text jobs claimed with it).

    Each job keeps its own result, error, lease and callback; only the encoder work is shared (the
    batch's vectors wait in the encoder's memory cache, keyed by the exact input, for its own jobs).
    A failed or timed-out prefetch costs nothing but the shared call: the jobs then encode alone."""
    runner = runner or default_runner(settings)
    if not runner.alive():
        runner.preload()
    # wait for company only under load (the last batch had several jobs): a lone request never waits
    wait_ms = settings.batch_wait_ms if getattr(runner, "last_batch", 1) > 1 else 0.0
    claimed = claim_batch(store, settings, first, wait_ms)
    if claimed:
        runner.last_batch = len(claimed)
    if len(claimed) > 1:
        _prefetch(store, claimed, settings, runner)
    out = [(job_id, _process_started(job_id, store, settings, runner)) for job_id in claimed]
    if first is not None and first not in claimed:
        out.insert(0, (first, None))
    return out


def claim_batch(
    store: JobStore, settings: Settings, first: str | None = None, wait_ms: float | None = None
) -> list[str]:
    """Jobs moved queued -> running for one batch, oldest first (empty: nothing queued); once one is
    claimed, more are awaited for ``wait_ms`` (default ``settings.batch_wait_ms``)."""
    claimed = [first] if first is not None and store.start(first) else []
    if first is None:
        job_id = store.next_queued()
        while job_id is not None and not claimed:
            if store.start(job_id):
                claimed.append(job_id)
            else:  # another worker took it: the next one
                job_id = store.next_queued()
    deadline = time.monotonic() + (settings.batch_wait_ms if wait_ms is None else wait_ms) / 1000
    alone = bool(claimed) and _is_media(store, claimed[0])  # read once, not on every poll of the wait
    while claimed and len(claimed) < settings.batch_max and not alone:
        job_id = store.next_queued()
        if job_id is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.0005)
        elif _is_media(store, job_id):  # runs alone, next: the batch ends before it
            break
        elif store.start(job_id):
            claimed.append(job_id)
    return claimed


def _is_media(store: JobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job is not None and job["kind"] == "media"


def _prefetch(store: JobStore, job_ids: list[str], settings: Settings, runner: ChildRunner) -> None:
    """One encoder call for the text of ``job_ids`` (see :func:`service.jobs.runner.prefetch_text`)."""
    items = []
    for job_id in job_ids:
        job = store.get(job_id)
        if job is None:
            continue
        if job["kind"] != APPEND:
            items.append({"job_dir": str(store.job_dir(job_id)), "model": job["model"]})
            continue
        try:  # an append: the conversation's turns + the new ones (read without its lease: only a hint)
            request = read_json(store.job_dir(job_id) / "request.json")
            conv_job = store.get(request["conversation_id"])
        except (OSError, ValueError, KeyError):
            continue
        if conv_job is not None and conv_job["kind"] != APPEND:
            folder = str(store.job_dir(conv_job["id"]))
            items.append({"job_dir": folder, "model": conv_job["model"], "append": request["utterances"]})
    started = time.perf_counter()
    try:
        runner.call("prefetch_text", settings.job_timeout_s, items=items, settings=settings)
    except Exception as e:  # the jobs encode their own text then
        log.warning("batch prefetch of %d jobs failed: %s", len(items), redact(str(e)))
    metrics.STAGE_SECONDS.labels("batch_text").observe(time.perf_counter() - started)
    metrics.BATCH_SIZE.observe(len(job_ids))


def _process_started(job_id: str, store: JobStore, settings: Settings, runner: ChildRunner) -> str:
    """Run a job already moved to ``running`` and record its outcome."""
    started = time.perf_counter()
    job = store.get(job_id)
    result, error = None, None
    try:
        if job is None:
            raise JobProblem(404, "unknown-conversation", "the job was deleted")
        result = _run_append(store, job, settings, runner) if job["kind"] == APPEND else _run(store, job, runner)
    except Exception as e:  # any failure must end the job, with its reason
        error = job_problem(e, settings)
        log.warning("job %s failed: %s", job_id, error["detail"], exc_info=error["type"].endswith("job-internal"))
    try:
        store.finish(job_id, result=result, error=error)
    except ValueError as e:  # a non-finite number slipped into the result: fail, never store it
        error = job_problem(JobProblem(422, "job-invalid-input", f"the result is not valid JSON ({e})"), settings)
        store.finish(job_id, error=error)
    status = FAILED if error else SUCCEEDED
    for stage, seconds in ((result or {}).get("timings") or {}).items():
        if seconds > 0:  # stages that did not run this time (no media) are not observed
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
    metrics.JOBS.labels(status).inc()
    metrics.JOB_SECONDS.observe(time.perf_counter() - started)
    for hook in FINISH_HOOKS:
        hook(job_id)
    _queue_callback(store, job_id)
    return status


def job_problem(e: Exception, settings: Settings) -> dict[str, Any]:
    """The problem+json ``error`` of a failed job (paths redacted)."""
    if isinstance(e, JobProblem):
        problem = e
    elif isinstance(e, JobTimeout):
        limit = settings.job_timeout_s
        detail = f"the job ran longer than MERC_JOB_TIMEOUT_S ({limit:g} s) and was stopped ({e})"
        problem = JobProblem(504, "job-timeout", detail)
    elif isinstance(e, Busy):
        holder = f" on {e.holder}" if e.holder else ""
        detail = f"another append to this conversation is still running{holder} (waited {e.waited_s:g} s)"
        problem = JobProblem(409, "conversation-busy", detail)
    elif isinstance(e, RemoteError) and e.invalid_input:
        problem = JobProblem(422, "job-invalid-input", str(e))
    elif isinstance(e, (RemoteError, ChildDied)):
        problem = JobProblem(500, "job-internal", f"{getattr(e, 'kind', type(e).__name__)}: {e}")
    else:
        problem = JobProblem(500, "job-internal", f"{type(e).__name__}: {e}")
    body = problem.body()
    body["detail"] = redact(body["detail"])
    return body


def _run(store: JobStore, job: dict[str, Any], runner: ChildRunner) -> dict[str, Any]:
    job_dir = store.job_dir(job["id"])
    out = runner.call(
        "run_conversation_job", runner.settings.job_timeout_s, job_dir=str(job_dir), model=job["model"],
        settings=runner.settings,
    )  # fmt: skip
    return out["result"]


def _queue_callback(store: JobStore, job_id: str) -> None:
    job = store.get(job_id)
    if job and job.get("callback_url") and job["kind"] != APPEND:
        store.outbox_add(job_id, job["callback_url"], callback_body(job))
        for hook in CALLBACK_HOOKS:
            hook()


CALLBACK_HOOKS: list[Callable[[], None]] = []  # a delivery was queued (wakes this process's Deliverer)


# ---------------------------------------------------------------- appended turns


def create_append(store: JobStore, conversation_id: str, model: str, utterances: list[dict[str, Any]]) -> str:
    """Queue an append job: new turns (validated request dicts) for ``conversation_id``."""
    job_id = store.new_id()
    folder = store.job_dir(job_id)
    folder.mkdir(parents=True)
    write_json(folder / "request.json", {"conversation_id": conversation_id, "utterances": utterances})
    store.create(job_id, model, APPEND, len(utterances))
    return job_id


def _run_append(store: JobStore, job: dict[str, Any], settings: Settings, runner: ChildRunner) -> dict[str, Any]:
    request = read_json(store.job_dir(job["id"]) / "request.json")
    conv_id, new = request["conversation_id"], request["utterances"]
    ttl = settings.job_timeout_s + 60  # the lease cannot outlive the job's own time limit
    with store.lock(f"conversation:{conv_id}", ttl_s=ttl, wait_s=settings.job_timeout_s):
        conv_job = store.get(conv_id)
        if conv_job is None or conv_job["kind"] == APPEND:
            raise JobProblem(404, "unknown-conversation", f"no conversation {conv_id}", "job_id")
        if conv_job["status"] != SUCCEEDED:
            detail = f"the conversation is {conv_job['status']}; turns can be appended once it has succeeded"
            raise JobProblem(409, "not-finished", detail, "job_id")
        folder = store.job_dir(conv_id)
        try:
            return _append_locked(store, conv_job, folder, new, settings, runner)
        except FileNotFoundError:  # DELETE removed the folder meanwhile
            raise JobProblem(404, "unknown-conversation", f"conversation {conv_id} was deleted", "job_id") from None


def _append_locked(
    store: JobStore, conv_job: dict, folder: Path, new: list[dict], settings: Settings, runner: ChildRunner
) -> dict[str, Any]:
    conv_request = read_json(folder / "request.json")
    conversation = conv_request["conversation"]
    old = [{**u, "id": u.get("id") or f"utt{i}"} for i, u in enumerate(conversation["utterances"])]  # default ids
    n_old = len(old)
    if n_old + len(new) > settings.max_utterances:
        detail = f"the conversation would exceed {settings.max_utterances} utterances"
        raise JobProblem(422, "too-many-utterances", detail, "utterances")
    added = assign_ids(new, [u["id"] for u in old])
    grown = {**conversation, "utterances": old + added}
    out = runner.call(
        "run_append", settings.job_timeout_s, job_dir=str(folder), model=conv_job["model"], conversation=grown,
        first=n_old, settings=settings,
    )  # fmt: skip
    result, n = _keep_readings(out["result"], conv_job.get("result") or {}, n_old), n_old + len(added)
    save_features(folder / "features.npz", out["features"], n)  # rows < n_old unchanged: a crash here is harmless
    write_json(folder / "request.json", {**conv_request, "conversation": grown})
    if not store.update_result(conv_job["id"], result, n, expected_n=conv_job["n_utterances"]):
        raise JobProblem(409, "not-finished", "the conversation changed or was deleted meanwhile", "job_id")
    return {**result, "utterances": result["utterances"][n_old:]}


def _keep_readings(result: dict[str, Any], previous: dict[str, Any], n_old: int) -> dict[str, Any]:
    """The earlier turns' face/voice readings (made from the media, which appends do not re-read)."""
    for new_u, old_u in zip(result["utterances"][:n_old], (previous.get("utterances") or [])[:n_old], strict=False):
        if old_u.get("readings") and not new_u.get("readings"):
            new_u["readings"] = old_u["readings"]
    if previous.get("readings") and not result.get("readings"):
        result["readings"] = previous["readings"]
    return result


def assign_ids(new: list[dict[str, Any]], taken: list[str]) -> list[dict[str, Any]]:
    """Copies of ``new`` with ids: given ones must be unused (422), missing ones become utt{index}."""
    used, out = set(taken), []
    for i, u in enumerate(new):
        if u.get("id") is not None and u["id"] in used:
            earlier = "an earlier utterance" if u["id"] in taken else "another new utterance"
            raise JobProblem(422, "duplicate-id", f"id {u['id']!r} is already used by {earlier}", f"utterances[{i}].id")
        if u.get("id") is not None:
            used.add(u["id"])
    for i, u in enumerate(new):
        uid, k = u.get("id"), 1
        if uid is None:
            uid = f"utt{len(taken) + i}"
            while uid in used:
                uid, k = f"utt{len(taken) + i}.{k}", k + 1
            used.add(uid)
        out.append({**u, "id": uid})
    return out


# ---------------------------------------------------------------- the in-process worker


class InProcessWorker:
    """Threads that take queued jobs from the store and run ``process_job`` on them, each with
    its own inference child (models loaded at start, again after a child was stopped)."""

    def __init__(self, store: JobStore, settings: Settings, threads: int = 1) -> None:
        self.store, self.settings, self.n_threads = store, settings, threads
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.runners = [ChildRunner(settings) for _ in range(threads)]
        self.heartbeat = time.monotonic()

    def start(self) -> None:
        """Start the threads; each first loads the models in its child (``ready`` after that)."""
        for i in range(self.n_threads):
            t = threading.Thread(target=self._loop, args=(self.runners[i],), name=f"merc-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def notify(self) -> None:
        """A job was queued: wake an idle thread now instead of at its next poll."""
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def loaded_models(self) -> list[str]:
        return sorted({m for r in self.runners for m in r.models})

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        for runner in self.runners:
            runner.kill()

    def _loop(self, runner: ChildRunner) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                if not runner.alive():  # stopped at a timeout or crashed: load the models again
                    runner.preload()
                if not process_batch(None, self.store, self.settings, runner):
                    self._wake.wait(1.0)
                    self._wake.clear()
            except Exception:  # the loop must survive a broken store read
                log.exception("worker loop error")
                time.sleep(0.5)


def error_status(error: dict[str, Any] | None) -> int:
    """The HTTP status a failed job's problem asks for (500 when it names none)."""
    status = (error or {}).get("status")
    return int(status) if isinstance(status, int) else 500


__all__ = [
    "APPEND",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "InProcessWorker",
    "JobProblem",
    "create_append",
    "process_batch",
    "process_job",
]
