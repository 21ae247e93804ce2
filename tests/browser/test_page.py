"""The page at / in a real headless Chromium against a real ``merc serve``: upload, chat, errors, API key."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import MEDIA, ROOT, Server

pytestmark = pytest.mark.slow
LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]  # sdt-meld7 and the default
MODEL = "sdt-meld7"


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def rows(driver) -> list:
    return driver.find_elements("css selector", "#utterances tbody tr[data-utterance-index]")


def open_page(driver, server: Server) -> None:
    """Load / and wait until the model selector is filled from GET /v1/models."""
    from selenium.webdriver.support.ui import Select

    driver.get(server.url + "/")
    wait(driver, lambda d: d.find_elements("css selector", f"#model option[value='{MODEL}']"))
    Select(driver.find_element("id", "model")).select_by_value(MODEL)


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[dict]:
    """SEVERE console entries, except network failures whose message names an ``allowed`` status."""
    logs = driver.get_log("browser")
    return [e for e in logs if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def job_of(driver, server: Server, **headers: str) -> dict:
    """The API's own view of the conversation the page shows."""
    job_id = driver.find_element("id", "result").get_attribute("data-conversation-id")
    return httpx.get(f"{server.url}/v1/conversations/{job_id}", headers=headers, timeout=30).json()


def assert_rows_match(driver, job: dict) -> None:
    """One row per utterance with the API's index and top emotion; the timeline agrees."""
    utts = job["result"]["utterances"]
    got = [(r.get_attribute("data-utterance-index"), r.get_attribute("data-emotion")) for r in rows(driver)]
    assert got == [(str(u["index"]), u["emotion"]) for u in utts]
    assert all(u["emotion"] in LABELS for u in utts)
    timeline = driver.find_element("css selector", "[data-timeline]")
    segments = timeline.find_elements("css selector", ".segment")
    assert sorted((s.get_attribute("data-segment"), s.get_attribute("data-emotion")) for s in segments) == sorted(
        (str(u["index"]), u["emotion"]) for u in utts
    )
    bands = [
        b.find_element("css selector", ".band-label").text for b in timeline.find_elements("css selector", ".band")
    ]
    assert bands == list(dict.fromkeys(u["speaker"] for u in utts))
    for row, u in zip(rows(driver), utts, strict=True):  # face/voice readings, where the job has them
        cell = row.find_elements("css selector", "td")[6].text
        for kind, reading in (u.get("readings") or {}).items():
            assert f"{kind}: {reading['emotion']}" in cell, (cell, reading)
    for s in segments:  # a text equivalent of the colour: the label names the emotion and the distribution
        label = s.get_attribute("aria-label")
        assert s.get_attribute("data-emotion") in label and all(k in label for k in LABELS)


RECORD_STATUS = """
window.statusSeen = [];
new MutationObserver(() => window.statusSeen.push(document.getElementById('status-text').textContent))
  .observe(document.getElementById('status'), {subtree: true, childList: true, characterData: true});
"""


def screenshot(driver, name: str, hover: str | None = None) -> None:
    """docs/figures/page-<name>.png, scrolled to the top, the mouse on ``hover``; only with MERC_PAGE_SCREENSHOTS=1."""
    if os.environ.get("MERC_PAGE_SCREENSHOTS") != "1":
        return
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains

    driver.set_window_size(1280, 1100)
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    if hover:
        ActionChains(driver).move_to_element(driver.find_element("css selector", hover)).perform()
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    out = ROOT / "docs" / "figures" / f"page-{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)  # ~60 kB, true colours


@pytest.mark.shared
def test_upload_a_face_video_with_its_transcript(browser, page_server, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    video = MEDIA / "single_face.mp4"
    if not video.is_file():
        pytest.skip("../shared/media/single_face.mp4 absent")
    transcript = tmp_path / "transcript.json"
    transcript.write_text(
        json.dumps(
            {
                "utterances": [
                    {"speaker": "Ana", "text": "Hello there, how are you?", "start": 0.0, "end": 1.2},
                    {"speaker": "Ben", "text": "I'm really happy to see you!", "start": 1.2, "end": 2.4},
                ]
            }
        )
    )
    open_page(browser, page_server)
    browser.find_element("css selector", "input[type=file][name=video]").send_keys(str(video))
    browser.find_element("css selector", "input[type=file][name=transcript]").send_keys(str(transcript))
    browser.execute_script(RECORD_STATUS)
    browser.find_element("id", "upload-submit").click()
    wait(browser, lambda d: len(rows(d)) == 2, timeout=300)
    seen = browser.execute_script("return window.statusSeen")
    assert any(s.startswith("Uploading") for s in seen) and seen[-1].startswith("Done: 2 utterances"), seen
    assert any(s.startswith(("Queued", "Running")) for s in seen), seen  # media jobs answer 202, then poll
    job = job_of(browser, page_server)
    assert job["status"] == "succeeded" and job["media"]["video"]["format"] == "mp4"
    assert_rows_match(browser, job)
    assert browser.find_element("css selector", "[data-timeline]").get_attribute("data-mode") == "time"
    first = rows(browser)[0].find_elements("css selector", "td")
    assert [first[1].text, first[2].text, first[5].text] == ["Ana", "0:00.0–0:01.2", "text"]
    bar = rows(browser)[0].find_element("css selector", ".dist")  # the distribution, with a text equivalent
    assert bar.get_attribute("role") == "img" and all(k in bar.get_attribute("aria-label") for k in LABELS)

    fits = "return [document.documentElement.scrollWidth <= innerWidth, (t => t.scrollWidth <= t.clientWidth)(%s)]"
    assert browser.execute_script(fits % "document.querySelector('.table-wrap')") == [True, True]  # a laptop screen
    player = browser.find_element("css selector", "#player-box video")
    wait(browser, lambda d: d.execute_script("return arguments[0].readyState", player) >= 1)
    second = browser.find_element("css selector", ".segment[data-segment='1']")
    second.send_keys(Keys.ENTER)  # keyboard: focus the segment, Enter seeks
    wait(browser, lambda d: abs(d.execute_script("return arguments[0].currentTime", player) - 1.2) < 0.05, 10)
    assert "selected" in rows(browser)[1].get_attribute("class")
    second.send_keys(Keys.ARROW_LEFT)  # arrow keys move between segments
    assert browser.switch_to.active_element.get_attribute("data-segment") == "0"
    second.send_keys(Keys.ARROW_RIGHT)
    tooltip = browser.find_element("id", "tooltip")
    assert tooltip.is_displayed() and all(k in tooltip.text for k in LABELS)  # focus shows the distribution
    ActionChains(browser).move_to_element(browser.find_element("css selector", ".segment[data-segment='0']")).perform()
    wait(browser, lambda d: "Hello there" in tooltip.text, 10)  # hover shows the other one's
    browser.find_element("css selector", ".segment[data-segment='0']").click()
    wait(browser, lambda d: d.execute_script("return arguments[0].currentTime", player) < 0.05, 10)
    screenshot(browser, "upload", hover=".segment[data-segment='1']")
    assert console_errors(browser) == []


def test_type_two_turns_each_scored_in_context(browser, page_server):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, page_server)
    speaker, text = browser.find_element("id", "chat-speaker"), browser.find_element("id", "chat-text")
    speaker.clear()
    speaker.send_keys("user")
    text.send_keys("My flight got cancelled again and nobody told me!", Keys.ENTER)  # Enter sends
    wait(browser, lambda d: len(rows(d)) == 1, timeout=120)
    first_id = browser.find_element("id", "result").get_attribute("data-conversation-id")
    speaker.clear()
    speaker.send_keys("bot")
    text.send_keys("I am so sorry. I can rebook you on the next flight for free.")
    browser.find_element("id", "chat-submit").click()
    wait(browser, lambda d: len(rows(d)) == 2, timeout=120)
    assert browser.find_element("id", "result").get_attribute("data-conversation-id") == first_id  # an append
    job = job_of(browser, page_server)
    assert job["n_utterances"] == 2 and [u["speaker"] for u in job["result"]["utterances"]] == ["user", "bot"]
    assert_rows_match(browser, job)
    assert browser.find_element("css selector", "[data-timeline]").get_attribute("data-mode") == "turns"
    assert "Turn 2 scored in context" in browser.find_element("id", "status").text
    assert text.get_attribute("value") == ""
    turns = (("user", "Really? Wow, thank you so much!"), ("bot", "You're welcome. Anything else?"))
    for n, (who, line) in enumerate(turns, start=3):  # more turns, for the figure
        speaker.clear()
        speaker.send_keys(who)
        text.send_keys(line, Keys.ENTER)
        wait(browser, lambda d, n=n: len(rows(d)) == n, timeout=120)
    screenshot(browser, "chat", hover=".segment[data-segment='2']")
    assert console_errors(browser) == []


@pytest.mark.shared
def test_media_without_a_transcript_is_recognised_or_refused_clearly(browser, page_server):
    """Speech recognition makes the transcript where the server has it; else the problem is shown."""
    video = MEDIA / "single_face.mp4"
    if not video.is_file():
        pytest.skip("../shared/media/single_face.mp4 absent")
    open_page(browser, page_server)
    browser.find_element("css selector", "input[type=file][name=video]").send_keys(str(video))
    browser.find_element("id", "upload-submit").click()
    box = browser.find_element("id", "error")
    wait(browser, lambda d: box.is_displayed() or rows(d), timeout=300)
    if rows(browser):
        assert "transcript: speech recognition" in browser.find_element("id", "summary").text
        assert_rows_match(browser, job_of(browser, page_server))
    else:  # no ASR (422 at once) or no speech found in this clip (the job fails with a problem)
        assert "(422)" in box.text and "transcript" in box.text.lower(), box.text
        assert browser.find_element("id", "status").text.startswith("Stopped")
    assert console_errors(browser, allowed=("status of 422",)) == []


def test_problem_json_is_shown_with_its_field(browser, page_server, tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"utterances": [{"speaker": "A", "text": "Hi", "start": 2.0, "end": 1.0}]}))
    open_page(browser, page_server)
    browser.find_element("css selector", "input[type=file][name=transcript]").send_keys(str(bad))
    browser.find_element("id", "upload-submit").click()
    box = browser.find_element("id", "error")
    wait(browser, lambda d: box.is_displayed(), timeout=60)
    assert "Unprocessable content (422)" in box.text and "end 1.0 is not after start 2.0" in box.text
    assert "transcript.utterances[0].end" in box.text
    assert browser.find_element("id", "transcript").get_attribute("aria-invalid") == "true"
    assert rows(browser) == [] and not browser.find_element("id", "result").is_displayed()
    assert console_errors(browser, allowed=("status of 422",)) == []


@pytest.fixture
def key_server(tmp_path: Path):
    """A second ``merc serve`` that requires an API key (a long start timeout: the CPUs are shared)."""
    server = Server(tmp_path / "data", tmp_path / "cache", MERC_API_KEYS="page-test-key")
    try:
        yield server.start(timeout=600)
    finally:
        server.stop()


def test_api_key_field_when_the_server_requires_one(browser, key_server):
    server = key_server
    browser.get(server.url + "/")
    key = browser.find_element("id", "api-key")
    wait(browser, lambda d: key.is_displayed(), timeout=30)  # GET /v1/models answered 401
    assert "X-API-Key" in browser.find_element("id", "error").text
    key.send_keys("page-test-key")
    browser.find_element("css selector", "#key-form button").click()
    wait(browser, lambda d: d.find_elements("css selector", f"#model option[value='{MODEL}']"), timeout=30)
    assert not browser.find_element("id", "error").is_displayed()
    browser.find_element("id", "chat-text").send_keys("Finally, it works!")
    browser.find_element("id", "chat-submit").click()
    wait(browser, lambda d: len(rows(d)) == 1, timeout=120)
    assert_rows_match(browser, job_of(browser, server, **{"X-API-Key": "page-test-key"}))
    assert console_errors(browser, allowed=("status of 401",)) == []
