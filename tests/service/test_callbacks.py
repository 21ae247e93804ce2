"""callback_url checks: only public hosts unless private ones are explicitly allowed."""

import pytest

from service.jobs.callbacks import callback_problem


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.0.7:9000/",
    ],
)
def test_private_hosts_are_refused_unless_allowed(url: str) -> None:
    reason = callback_problem(url, allow_private=False)
    assert reason and "non-public" in reason
    assert callback_problem(url, allow_private=True) is None


def test_public_address_and_bad_urls() -> None:
    assert callback_problem("https://93.184.215.14/hook", allow_private=False) is None
    assert "not an http(s) URL" in callback_problem("ftp://93.184.215.14/x", allow_private=True)
    assert "cannot be resolved" in callback_problem("http://no-such-host.invalid/x", allow_private=False)
