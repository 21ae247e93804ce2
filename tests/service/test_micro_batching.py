"""Micro-batching in the job runner: queued jobs claimed together, their text encoded in one call in
the inference child, each job still finishing with its own result, the same as when run alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.jobs.sandbox import ChildRunner
from service.jobs.store import JobStore
from service.jobs.worker import claim_batch, create_append, process_batch
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
LINES = [
    "You did WHAT with my car?",
    "Relax, it is parked outside, not a scratch.",
    "Oh thank god, I was about to lose it.",
    "Next time I'll ask first, I promise.",
    "You'd better. Pizza tonight?",
]


def _queue(store: JobStore, k: int, model: str) -> str:
    job_id = store.new_id()
    folder = store.job_dir(job_id)
    folder.mkdir(parents=True)
    utts = [{"id": f"u{i}", "speaker": "AB"[i % 2], "text": f"{LINES[(i + k) % 5]} ({k})"} for i in range(4 + k)]
    conv = {"id": job_id, "utterances": utts}
    (folder / "request.json").write_text(json.dumps({"conversation": conv, "model": model, "media": {}}))
    store.create(job_id, model, "text", len(utts))
    return job_id


def _distributions(store: JobStore, job_id: str) -> list[dict[str, float]]:
    job = store.get(job_id)
    assert job is not None and job["status"] == "succeeded", job
    return [u["distribution"] for u in job["result"]["utterances"]]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    if not (ROOT / "weights" / Settings().default_model / "manifest.json").is_file():
        pytest.skip("the default bundle is not in weights/")
    return Settings(device="cpu", weights_dir=ROOT / "weights", data_dir=tmp_path_factory.mktemp("d"), batch_max=8)


def _child(settings: Settings, cache: Path) -> ChildRunner:
    """A started inference child with its own, empty embedding cache (memory and disk)."""
    runner = ChildRunner(settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERC_CACHE_DIR", str(cache))
        runner.preload()  # the child starts now, with this environment
    return runner


@pytest.fixture(scope="module")
def runner(settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    r = _child(settings, tmp_path_factory.mktemp("cache"))
    yield r
    r.kill()


@pytest.fixture(scope="module")
def other_runner(settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    """A second child: jobs run alone there cannot read vectors the batched run left in a cache."""
    r = _child(settings, tmp_path_factory.mktemp("cache2"))
    yield r
    r.kill()


def test_claim_batch_takes_the_oldest_up_to_the_limit(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = [_queue(store, k, "m") for k in range(5)]
    settings = Settings(data_dir=tmp_path, batch_max=3, batch_wait_ms=0)
    assert claim_batch(store, settings) == ids[:3]
    assert claim_batch(store, settings, first=ids[4]) == [ids[4], ids[3]]
    assert claim_batch(store, settings, first=ids[0]) == []  # not queued any more: nothing claimed
    assert claim_batch(store, settings) == []
    media = store.new_id()
    store.create(media, "m", "media", 1)
    later = _queue(store, 7, "m")
    assert claim_batch(store, settings) == [media]  # a media job runs alone ...
    assert claim_batch(store, settings) == [later]
    text, media2 = _queue(store, 8, "m"), store.new_id()
    store.create(media2, "m", "media", 1)
    assert claim_batch(store, settings) == [text]  # ... and is never claimed behind a text job
    assert claim_batch(store, settings) == [media2]


def test_batched_jobs_match_jobs_run_alone(
    settings: Settings, runner: ChildRunner, other_runner: ChildRunner, tmp_path: Path
) -> None:
    model = settings.default_model
    batched = JobStore(settings.data_dir)
    ids = [_queue(batched, k, model) for k in range(5)]
    done = process_batch(None, batched, settings, runner)
    assert done == [(i, "succeeded") for i in ids]  # one batch: all five claimed together

    alone_settings = settings.model_copy(update={"data_dir": tmp_path, "batch_max": 1})
    alone = JobStore(tmp_path)
    solo = [_queue(alone, k, model) for k in range(5)]
    for job_id in solo:
        assert process_batch(None, alone, alone_settings, other_runner) == [(job_id, "succeeded")]
    for a, b in zip(ids, solo, strict=True):
        for da, db in zip(_distributions(batched, a), _distributions(alone, b), strict=True):
            assert da.keys() == db.keys()
            assert max(abs(da[k] - db[k]) for k in da) < 1e-4

    # an append and a new conversation in one batch; the append equals the one run alone
    new = [{"speaker": "A", "text": "Fine. Pepperoni, and you are paying."}]
    appends = [create_append(s, i, model, new) for s, i in ((batched, ids[0]), (alone, solo[0]))]
    extra = _queue(batched, 9, model)
    assert process_batch(None, batched, settings, runner) == [(appends[0], "succeeded"), (extra, "succeeded")]
    assert process_batch(None, alone, alone_settings, other_runner) == [(appends[1], "succeeded")]
    last = [_distributions(s, i)[-1] for s, i in ((batched, ids[0]), (alone, solo[0]))]
    assert max(abs(last[0][k] - last[1][k]) for k in last[0]) < 1e-4
    assert len(_distributions(batched, ids[0])) == 5


def test_a_job_not_queued_is_reported_and_nothing_else_runs(settings: Settings, runner: ChildRunner) -> None:
    store = JobStore(settings.data_dir)
    job_id = _queue(store, 0, settings.default_model)
    assert process_batch(job_id, store, settings, runner) == [(job_id, "succeeded")]
    assert process_batch(job_id, store, settings, runner) == [(job_id, None)]


def test_a_lone_request_never_waits_for_company(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bounded batch wait applies only under load: after a batch of several jobs, not after one."""
    import service.jobs.worker as worker

    waits: list[float | None] = []
    sizes = iter([1, 3, 1])

    def claim(store, settings, first=None, wait_ms=None):  # records the wait, claims nothing runnable
        waits.append(wait_ms)
        worker_runner.last_batch = next(sizes)
        return []

    class Runner:
        last_batch = 1

        def alive(self) -> bool:
            return True

    worker_runner = Runner()
    monkeypatch.setattr(worker, "claim_batch", claim)
    settings = Settings(data_dir=tmp_path, batch_wait_ms=5)
    for _ in range(3):
        worker.process_batch(None, JobStore(tmp_path), settings, worker_runner)  # type: ignore[arg-type]
    assert waits == [0.0, 0.0, 5.0]  # the first two follow single-job batches, the third a batch of 3
