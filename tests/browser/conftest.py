"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by selenium against a real
``merc serve``; every test here skips when selenium, the browser or its driver is missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import MEDIA, Server, server_factory  # server_factory: the API tests' fixture

__all__ = ["MEDIA", "Server", "server_factory"]
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    """A fresh headless Chromium (own profile) that records console messages."""
    pytest.importorskip("selenium", reason="selenium not installed (dev extras)")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium/chromedriver (scripts/setup.sh installs them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium: no usage statistics (offline)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_server(server_factory) -> Server:
    """One ``merc serve`` (default model, in-process worker) for the module's browser tests."""
    return server_factory()
