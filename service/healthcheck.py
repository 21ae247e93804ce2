"""Container health checks without curl: ``python -m service.healthcheck URL [METRIC=VALUE ...]``.

Exit 0 when ``URL`` answers 2xx within 3 s and, for each ``METRIC=VALUE``, the Prometheus
text it returned has that sample with that value (e.g. ``merc_worker_ready=1``); else 1.
The worker's check reads its metrics port, which answers even while a job holds the
solo pool (``celery inspect ping`` would not).
"""

from __future__ import annotations

import sys
import urllib.request


def sample_value(text: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in Prometheus text format, or None."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return float(parts[1])
    return None


def check(url: str, expected: dict[str, float], timeout: float = 3.0) -> str | None:
    """None when healthy, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
    except OSError as e:
        return f"{url}: {e}"
    for name, want in expected.items():
        got = sample_value(body, name)
        if got != want:
            return f"{name} is {got}, expected {want}"
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    expected = {k: float(v) for k, v in (a.split("=", 1) for a in argv[1:])}
    reason = check(argv[0], expected)
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
