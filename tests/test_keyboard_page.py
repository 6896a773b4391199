"""The keyboard page at ``/`` in a real browser: Debian's headless ``chromium`` driven through its
``chromedriver`` (selenium, with both paths given so Selenium Manager never runs and nothing is
downloaded), against a real uvicorn serving the shipped model in ``models/``.

The page's screenshot is written to ``docs/demo.png`` when ``NEXTWORD_UPDATE_DEMO_PNG=1``
(``make demo-png``), so an ordinary test run leaves the tree clean."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODELS = ROOT / "models"
DEMO_PNG = ROOT / "docs" / "demo.png"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt install chromium chromium-driver)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt install chromium-driver)"),
    pytest.mark.skipif(not any(SHIPPED_MODELS.glob("*/*/model.json")), reason="no shipped model in models/"),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PROMPT = "the president of the united st"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_download(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("Selenium Manager must not run: the driver and browser paths are given")

    patch = pytest.MonkeyPatch()
    patch.setattr(SeleniumManager, "binary_paths", no_download)
    work = tmp_path_factory.mktemp("chromium")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--force-device-scale-factor=1", "--window-size=880,680", f"--user-data-dir={work / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(work / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        patch.undo()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 10.0) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        state = driver.execute_script(
            "const s = window.__nextword && window.__nextword.state, $ = (id) => document.getElementById(id);"
            "return {text: $('text').value, status: $('status').textContent, message: $('message').textContent,"
            " chips: Array.from(document.querySelectorAll('#chips .word'), e => e.textContent),"
            " ready: s && s.ready, sent: s && s.sent};"
        )
        raise AssertionError(f"timed out waiting for {what}; page: {state}") from None


def chip_words(driver: Any) -> list[str]:
    """The three chips left to right (the best is in the middle)."""
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chips .chip .word")]


def text_of(driver: Any) -> str:
    return driver.execute_script("return document.getElementById('text').value")


def status(driver: Any) -> str:
    return driver.find_element(By.ID, "status").text


def message(driver: Any) -> str:
    return driver.find_element(By.ID, "message").text


def page_state(driver: Any, field: str) -> Any:
    path = field.replace(".", "?.")
    return driver.execute_script(f"return window.__nextword.state.{path}")


def replies(driver: Any) -> int:
    """A counter of shown predictions, to wait for the next one."""
    return driver.execute_script("return window.__shown || 0")


def count_replies(driver: Any) -> None:
    driver.execute_script(
        "window.__shown = 0;"
        "new MutationObserver(() => { window.__shown += 1; })"
        ".observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});"
    )


def test_typing_in_the_browser(browser: Any, start_server: Callable, tmp_path: Path) -> None:
    server = start_server(SHIPPED_MODELS, env={"NEXTWORD_SESSION_STORE": "memory"})
    driver = browser
    driver.get(server.url + "/")
    wait_for(driver, lambda d: "round trip" in status(d), "the first session")
    assert driver.execute_script("return document.getElementById('model').options.length") >= 2  # from /v1/models
    count_replies(driver)
    box = driver.find_element(By.ID, "text")
    box.click()

    # Every keystroke goes over the socket; "States" (its usual written form) ends up among the chips.
    for ch in PROMPT:
        box.send_keys(ch)
    wait_for(driver, lambda d: "States" in chip_words(d) and page_state(d, "sent") == PROMPT, "'States' in a chip")
    assert page_state(driver, "seq") == len(PROMPT), "one message per keystroke on one socket"
    assert "session kept" in status(driver)
    shot = tmp_path / "demo.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("NEXTWORD_UPDATE_DEMO_PNG") == "1":
        shutil.copyfile(shot, DEMO_PNG)

    # Clicking the chip completes the word and adds a space; the next word is suggested.
    socket_before = driver.execute_script("return window.__seen = window.__nextword.socket, 1")
    assert socket_before == 1
    chip = next(c for c in driver.find_elements(By.CSS_SELECTOR, "#chips .chip") if c.text.startswith("States"))
    chip.click()
    assert text_of(driver) == "the president of the united States "
    wait_for(driver, lambda d: page_state(d, "sent") == "the president of the united States "
             and "States" not in chip_words(d) and any(chip_words(d)), "next-word suggestions after the click")

    # Backspace inside a word: replace_pending on the same socket, suggestions for the new prefix.
    for ch in "of th":
        box.send_keys(ch)
    wait_for(driver, lambda d: page_state(d, "last.prefix") == "th", "suggestions for 'th'")
    shown, for_th = replies(driver), page_state(driver, "last.predictions")
    box.send_keys(Keys.BACKSPACE)
    wait_for(driver, lambda d: replies(d) > shown and page_state(d, "last.prefix") == "t", "suggestions for 't'")
    words = [w for w in chip_words(driver) if w]
    assert words and all(w.lower().startswith("t") for w in words), words
    # Probabilities are renormalised over the words starting with "t" now: they differ.
    assert page_state(driver, "last.predictions") != for_th, "suggestions did not change after Backspace"
    assert driver.execute_script("return window.__nextword.socket === window.__seen"), "Backspace restarted the session"

    # Deleting back into a committed word starts a new session from the whole text.
    box.send_keys(Keys.BACKSPACE, Keys.BACKSPACE)  # "... States of t" -> "... States of"
    wait_for(driver, lambda d: "edit before the current word" in status(d), "a restarted session")
    assert text_of(driver) == "the president of the united States of"

    # A dropped socket: a new session from the current text, and typing goes on.
    driver.execute_script("window.__nextword.socket.close()")
    wait_for(driver, lambda d: "reconnected" in status(d), "the reconnection")
    box.send_keys(" th")
    wait_for(driver, lambda d: page_state(d, "sent") == text_of(d) and "session kept" in status(d), "typing after it")

    # A session that ends server-side (deleted here, like an expiry): a short message, a new session.
    session_id = page_state(driver, "sessionId")
    assert httpx.delete(f"{server.url}/v1/sessions/{session_id}", timeout=10).status_code == 204
    box.send_keys("e")
    wait_for(driver, lambda d: "new one was started" in message(d), "the session-ended message")
    wait_for(driver, lambda d: page_state(d, "sessionId") not in (None, session_id)
             and page_state(d, "sent") == text_of(d) and page_state(d, "last.prefix") == "the", "the new session")

    # Tab takes the middle (best) suggestion.
    best = chip_words(driver)[1]
    box.send_keys(Keys.TAB)
    assert text_of(driver).endswith(f" {best} ") or text_of(driver).endswith(f"{best} "), text_of(driver)
    assert driver.switch_to.active_element == box, "Tab left the text box instead of taking the suggestion"

    # Continue: words stream in from /v1/generate.
    before = text_of(driver)
    driver.find_element(By.ID, "continue").click()
    wait_for(driver, lambda d: "continued:" in d.find_element(By.ID, "generation").text, "the continuation", timeout=20)
    assert len(text_of(driver)) > len(before) and text_of(driver).startswith(before)
    assert "Continue" not in message(driver), message(driver)

    # Keyboard only: Esc hides the suggestions, then Tab leaves the text box for the next control.
    box.send_keys(Keys.ESCAPE, Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("id") == "continue"

    # The model/version picker (from /v1/models) opens a session on the chosen version.
    picker = Select(driver.find_element(By.ID, "model"))
    picker.select_by_index(1)  # the shipped model's version named explicitly
    wait_for(driver, lambda d: "model changed" in status(d), "a session on the chosen version")
    assert f" v{next(SHIPPED_MODELS.glob('*/*/model.json')).parent.name}" in status(driver)

    # A long, non-ASCII text opens its session with a tail that fits in the URL.
    long_text = "Grüße, 東京 😀 and more words " * 700 + PROMPT
    driver.execute_script(
        "const t = document.getElementById('text'); t.value = arguments[0];"
        "t.setSelectionRange(t.value.length, t.value.length); t.dispatchEvent(new Event('input'));", long_text)
    wait_for(driver, lambda d: page_state(d, "sent") == long_text and "States" in chip_words(d), "the long text")
    assert len(driver.execute_script("return window.__nextword.socket.url")) < 6500

    problems = [e["message"] for e in driver.get_log("browser")
                if e["level"] == "SEVERE" and ("Uncaught" in e["message"] or "Content Security Policy" in e["message"])]
    assert not problems, problems


def test_no_model_loaded_is_a_message_not_a_frozen_page(browser: Any, start_server: Callable, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty, ready=False)
    driver = browser
    driver.get(server.url + "/")
    wait_for(driver, lambda d: "no model is loaded yet" in message(d), "the no-model message")
    box = driver.find_element(By.ID, "text")
    box.send_keys("still typing")
    assert text_of(driver) == "still typing"
    assert "Traceback" not in driver.page_source


def test_status_says_when_the_session_was_rebuilt(browser: Any, start_server: Callable, tmp_path: Path) -> None:
    # Two versions of the shipped model; the session starts on the newest, which then goes away.
    repository = tmp_path / "models"
    shipped = next(SHIPPED_MODELS.glob("*/*/model.json")).parent
    first = shutil.copytree(shipped, repository / shipped.parent.name / "1")
    second = shutil.copytree(shipped, repository / shipped.parent.name / "2")
    card = json.loads((second / "model.json").read_text())
    (first / "model.json").write_text(json.dumps({**card, "version": 1}))
    (second / "model.json").write_text(json.dumps({**card, "version": 2}))
    server = start_server(repository)
    driver = browser
    driver.get(server.url + "/")
    box = driver.find_element(By.ID, "text")
    box.send_keys("the united ")
    wait_for(driver, lambda d: page_state(d, "sent") == "the united " and "round trip" in status(d), "a session")
    assert page_state(driver, "last.version") == 2
    shutil.rmtree(repository / shipped.parent.name / "2")
    assert httpx.post(f"{server.url}/v1/models/reload", timeout=30).json()["unloaded"] == [f"{shipped.parent.name}/2"]
    box.send_keys("s")
    wait_for(driver, lambda d: "session rebuilt on version 1" in status(d), "the rebuilt note")
    assert "goes on with version 1" in message(driver)
    box.send_keys("t")
    kept = f"session kept · {shipped.parent.name} v1"
    wait_for(driver, lambda d: kept in status(d) and "States" in chip_words(d), "the next keystroke")


def test_page_reconnects_after_the_server_restarts(browser: Any, start_server: Callable) -> None:
    first = start_server(SHIPPED_MODELS)
    driver = browser
    driver.get(first.url + "/")
    box = driver.find_element(By.ID, "text")
    box.send_keys("the united ")
    wait_for(driver, lambda d: page_state(d, "sent") == "the united " and "round trip" in status(d), "a session")
    first.stop()  # SIGTERM: the socket closes (1012 "service restart") and the port goes dark
    wait_for(driver, lambda d: "reconnecting" in message(d), "the reconnecting message")
    box.send_keys("st")  # typing goes on while the service is down
    assert text_of(driver) == "the united st"
    port = int(first.url.rsplit(":", 1)[1])
    start_server(SHIPPED_MODELS, port=port)
    wait_for(driver, lambda d: "reconnected" in status(d) and "States" in chip_words(d), "the reconnection", timeout=20)
    assert not message(driver)


def test_a_session_store_outage_is_a_message_then_the_page_recovers(browser: Any, start_server: Callable,
                                                                    tmp_path: Path) -> None:
    """A keystroke answered 503 (the Redis store is down): a short message, typing goes on, and the
    page reconnects by itself once the store is back (empty: a new session from the text)."""
    from processes import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt install redis-server)")
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        server = start_server(SHIPPED_MODELS, env={"NEXTWORD_SESSION_STORE": redis.url,
                                                   "NEXTWORD_SESSION_STORE_TIMEOUT_SECONDS": "1"})
        driver = browser
        driver.get(server.url + "/")
        box = driver.find_element(By.ID, "text")
        box.send_keys("the united ")
        wait_for(driver, lambda d: page_state(d, "sent") == "the united " and "round trip" in status(d), "a session")
        redis.stop()
        box.send_keys("s")
        wait_for(driver, lambda d: "the session store is unreachable" in message(d), "the store-outage message")
        assert message(driver).startswith("Suggestions paused") and len(message(driver)) < 120, message(driver)
        box.send_keys("t")  # the page is not frozen: typing goes on
        assert text_of(driver) == "the united st"
        assert "Traceback" not in driver.page_source
        redis.start()
        wait_for(driver, lambda d: not message(d) and page_state(d, "sent") == text_of(d)
                 and "States" in chip_words(d), "the recovery once the store is back", timeout=30)
    finally:
        redis.stop()


def test_an_idle_session_closes_with_a_message_and_reopens_as_you_type(browser: Any,
                                                                       start_server: Callable) -> None:
    """A session idle past its TTL ends (the server closes the socket): the page says so in a
    short line, and the next keystroke opens a new session from the text."""
    server = start_server(SHIPPED_MODELS, env={"NEXTWORD_SESSION_TTL_SECONDS": "5"})
    driver = browser
    driver.get(server.url + "/")
    box = driver.find_element(By.ID, "text")
    box.send_keys("the united ")
    wait_for(driver, lambda d: page_state(d, "sent") == "the united " and "round trip" in status(d), "a session")
    first = page_state(driver, "sessionId")
    wait_for(driver, lambda d: "closed after being idle" in message(d), "the idle message", timeout=20)
    assert page_state(driver, "sessionId") is None
    box.send_keys("s")
    wait_for(driver, lambda d: "was idle" in status(d) and page_state(d, "sent") == text_of(d) and not message(d),
             "a new session from the text")
    assert page_state(driver, "sessionId") not in (None, first)
    box.send_keys("t")
    wait_for(driver, lambda d: "session kept" in status(d) and "States" in chip_words(d), "the next keystroke")
    # Gboard's strip: the best suggestion in the middle, the second left, the third right.
    best = [p["display"] for p in page_state(driver, "last.predictions")[:3]]
    assert chip_words(driver) == [best[1], best[0], best[2]], (chip_words(driver), best)


def test_more_suggestions_and_edits_before_the_current_word(browser: Any, start_server: Callable) -> None:
    """k asks the same session again; deleting a selection before the current word, or pasting
    there, starts a new session from the text before the cursor."""
    server = start_server(SHIPPED_MODELS, env={"NEXTWORD_SESSION_STORE": "memory"})
    driver = browser
    driver.get(server.url + "/")
    box = driver.find_element(By.ID, "text")
    box.send_keys("the united st")
    wait_for(driver, lambda d: page_state(d, "sent") == "the united st" and "States" in chip_words(d), "a session")
    driver.execute_script("window.__seen = window.__nextword.socket")

    driver.execute_script("const k = document.getElementById('k'); k.value = '6'; k.dispatchEvent(new Event('change'))")
    wait_for(driver, lambda d: len(page_state(d, "last.predictions")) == 6
             and len(d.find_elements(By.CSS_SELECTOR, "#more button")) == 3, "six suggestions")
    assert driver.execute_script("return window.__nextword.socket === window.__seen"), "k restarted the session"

    # Select "united " and delete it: the cursor is now before the current word.
    driver.execute_script("const t = document.getElementById('text'); t.focus(); t.setSelectionRange(4, 11)")
    box.send_keys(Keys.DELETE)
    assert text_of(driver) == "the st"
    wait_for(driver, lambda d: page_state(d, "sent") == "the " and "edit before the current word" in status(d),
             "a new session after deleting a selection")

    # A paste at the start (several characters inserted at once, as a paste does).
    driver.execute_script("const t = document.getElementById('text'); t.setSelectionRange(0, 0);"
                          "document.execCommand('insertText', false, 'Yes, ')")
    assert text_of(driver) == "Yes, the st"
    wait_for(driver, lambda d: page_state(d, "sent") == "Yes, " and page_state(d, "ready"),
             "a new session after a paste")
    box.send_keys(Keys.END)  # back to the end: the rest goes to the same session as a delta
    wait_for(driver, lambda d: page_state(d, "sent") == "Yes, the st" and "session kept" in status(d), "the rest")
    assert "Traceback" not in driver.page_source and not message(driver)
