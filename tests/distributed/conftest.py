"""A real ``redis-server`` per test module (the tests skip when the Debian package is absent), and
the client and store fixtures of modules that define a ``cluster`` (a ``LocalCluster``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.local_cluster import Proc, free_port, wait_until

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """redis://127.0.0.1:<port>/0 of a fresh redis-server, stopped after the module."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    import redis

    base = tmp_path_factory.mktemp("redis")
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base), "--save", ""]
    proc = Proc("redis", cmd, dict(os.environ), base).start()
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 20, "redis-server", proc)
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api(cluster) -> Iterator:
    """An HTTP client of the module's cluster API."""
    import httpx

    with httpx.Client(base_url=cluster.api_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def store(cluster) -> Iterator:
    """The module's cluster job store, opened like a worker or API does."""
    from service.jobs.redis_store import RedisJobStore

    s = RedisJobStore(cluster.queue_url, cluster.data_dir)
    yield s
    s.close()
