"""The chat page in a real headless Chromium (the distribution's package, driven by Playwright): it
loads, takes a prompt (and an English version), and shows the answers with the connection and
without it, and the layer the Decision Maker chose, as the API gives them. A screenshot of the
page is saved: under ``$CCTUNING_ARTIFACTS`` when set, else pytest's temporary folder (its path is
printed).

Skipped, with the reason, where Playwright or Chromium is missing (``.ci/run`` installs Chromium;
``$CCTUNING_CHROMIUM`` names another executable)."""

import os
import shutil
from pathlib import Path

import openai
import pytest

from cctuning.inference import CCGenerator
from cctuning.serve.server import Server, bind, build
from tests.conftest import connected_model
from tests.serve.conftest import ENGLISH, PROMPTS


def chromium() -> str:
    path = os.environ.get("CCTUNING_CHROMIUM") or next(
        (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
    )
    if not path:
        pytest.skip("no Chromium here (apt-get install chromium, or set CCTUNING_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def server(tokenizer):
    gen = CCGenerator(connected_model(tokenizer, seed=3), tokenizer, max_new_tokens=12)
    built = build(gen, "cc", api_key="sk-page")
    srv = Server(built.app, bind("127.0.0.1", 0)).start()
    yield srv.url, gen
    srv.stop()
    built.engine.stop()


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True)
        # the page itself needs the key: the browser answers its Basic challenge with these
        credentials = {"username": "me", "password": "sk-page"}
        context = browser.new_context(viewport={"width": 1200, "height": 800}, http_credentials=credentials)
        yield context.new_page()
        browser.close()


def ask(page, url, prompt, english="", max_tokens=12, key="sk-page"):
    page.goto(url + "/")
    page.fill("#api-key", key)
    page.fill("#prompt", prompt)
    page.fill("#english", english)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#send")
    page.wait_for_selector("#answers[data-state=done]", timeout=60_000)
    read = {pane: page.text_content(f"#answer-{pane}") for pane in ("with", "without")}
    return read, {pane: page.inner_text(f"#layer-{pane}") for pane in ("with", "without")}


def api(url, prompt, **extra):
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-page", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    answer = client.chat.completions.create(
        model="cc", messages=messages, max_tokens=12, temperature=0, extra_body=extra
    )
    return answer.choices[0].message.content


def test_the_page_shows_both_answers_and_the_layer(server, page, tmp_path):
    url, gen = server
    transform, none = gen.generate(PROMPTS[:1], "transform")[0], gen.generate(PROMPTS[:1], "none")[0]
    answers, layers = ask(page, url, PROMPTS[0])
    assert (
        answers
        == {"with": transform.text, "without": none.text}
        == {"with": api(url, PROMPTS[0]), "without": api(url, PROMPTS[0], connection="none")}
    )
    assert answers["with"] != answers["without"]
    assert layers == {
        "with": f"layer {transform.layer} chosen by the Decision Maker",
        "without": "no layer (no connection)",
    }
    assert page.inner_text("#model") == "cc" and "connection transform" in page.inner_text("#connection-with")
    oracle = gen.generate(PROMPTS[1:2], "english", english=ENGLISH[1:2])[0]
    answers, layers = ask(page, url, PROMPTS[1], ENGLISH[1])
    assert (
        answers["with"] == oracle.text == api(url, PROMPTS[1], english=ENGLISH[1])
        and layers["with"] == f"layer {oracle.layer} chosen by the Decision Maker"
    )
    assert "connection english" in page.inner_text("#connection-with")
    folder = Path(os.environ.get("CCTUNING_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"chat page screenshot: {shot}")


def test_the_browser_sends_the_pages_credentials_when_the_key_field_is_empty(server, page):
    url, gen = server
    answers, _ = ask(page, url, PROMPTS[2], key="")
    assert answers["with"] == gen.generate(PROMPTS[2:3], "transform")[0].text


def test_the_page_says_what_went_wrong(server, page):
    url, _ = server
    page.goto(url + "/")
    page.fill("#api-key", "wrong")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector("#answers[data-state=error]", timeout=30_000)
    assert "API key" in page.inner_text("#status")
