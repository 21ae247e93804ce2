"""A real ``redis-server`` per test module (the tests skip when the Debian package is absent)."""

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
