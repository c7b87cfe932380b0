"""The page at /, in a real browser: Debian's chromium, driven by Playwright, against the real
service under uvicorn on a loopback port. On failure, a screenshot of every state the test
reached is written to its tmp_path (NN-state.png)."""

import contextlib
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from bench.load import multipart_body
from bench.servers import service_process
from service.images import decode, open_image
from tests.service_helpers import encode
from tests.synthetic import make_images

LARGE, SMALL = "cifar100-5735844", "cifar100-712868"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags chromium calls Google at startup.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPLOAD_LIMIT = 60_000  # MAX_UPLOAD_BYTES of the server under test: small, to reach the 413
TIMEOUT_MS = 30_000  # two shared CPUs: generous
X = "\u00d7"  # the page writes sizes as 96\u00d764


# --- the service and the browser -----------------------------------------------------------


@contextlib.contextmanager
def service_server(**settings: object):
    """Our real server (`python -m service`) in its own process; yields its base URL once
    it answers /health/live (a server without models never becomes ready)."""
    with service_process(ready_path="/health/live", log_json=False, **settings) as (port, _):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def reports_dir(tmp_path_factory) -> Path:
    """A report for the small model only: the page must link to it and say the other has none."""
    root = tmp_path_factory.mktemp("reports")
    (root / SMALL).mkdir()
    (root / SMALL / "index.html").write_text("<!doctype html><title>r</title><h1>Test report</h1>")
    return root


@pytest.fixture(scope="module")
def base_url(models_dir, reports_dir):
    with service_server(
        models_dir=models_dir, reports_dir=reports_dir, max_upload_bytes=UPLOAD_LIMIT
    ) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no chromium at {CHROMIUM}: the page tests need a real browser. Install Debian's "
            "(`apt-get install -y chromium`, as .ci/run does) or set CHROMIUM=/path/to/chrome",
            pytrace=False,
        )
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'", pytrace=False)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Visit:
    """One browser context: every request it makes, and a screenshot per state reached."""

    def __init__(self, context, base: str) -> None:
        self.context, self.base = context, base
        self.requests: list[str] = []
        self.errors: list[str] = []
        context.on("request", lambda request: self.requests.append(request.url))
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.shots: list[tuple[str, bytes]] = []

    def state(self, name: str) -> None:
        self.shots.append((name, self.page.screenshot(full_page=True)))

    def open(self, path: str = "/"):
        response = self.page.goto(self.base + path)
        assert response is not None and response.ok, response and response.status
        self.expect(self.page.locator("#cards .card")).not_to_have_count(0)
        self.state("loaded")
        return response

    def upload(self, *files: tuple[str, bytes, str]) -> None:
        self.page.set_input_files(
            "#files", files=[{"name": n, "mimeType": m, "buffer": b} for n, b, m in files]
        )

    def finished(self, count: int):
        """The result cards, once `count` of them have their answers."""
        self.expect(self.page.locator(".result[data-state]")).to_have_count(count)
        self.state(f"{count}-results")
        return self.page.locator(".result")

    @property
    def expect(self):
        from playwright.sync_api import expect

        return expect

    def assert_only_local(self) -> None:
        """Nothing the page did reached beyond this service."""
        assert self.requests, "no request was recorded"
        origin = urlsplit(self.base)
        for url in self.requests:
            parts = urlsplit(url.removeprefix("blob:"))
            if parts.scheme == "data":
                continue
            assert (parts.scheme, parts.hostname, parts.port) == (
                "http",
                "127.0.0.1",
                origin.port,
            ), f"the page requested {url}"
        assert not self.errors, f"JavaScript errors: {self.errors}"


@pytest.fixture
def visit(browser, base_url, request, tmp_path):
    yield from _visit(browser, base_url, request, tmp_path, {"width": 1280, "height": 900})


@pytest.fixture
def phone(browser, base_url, request, tmp_path):
    yield from _visit(browser, base_url, request, tmp_path, {"width": 390, "height": 844})


def _visit(browser, base, request, tmp_path, viewport):
    context = browser.new_context(viewport=viewport)
    visit = Visit(context, base)
    failed_before = request.session.testsfailed
    try:
        yield visit
    finally:
        # The call phase is reported (and counted) before fixtures are torn down.
        if request.session.testsfailed > failed_before:
            with contextlib.suppress(Exception):
                visit.state("at-failure")
            for i, (name, png) in enumerate(visit.shots):
                (tmp_path / f"{i:02d}-{name}.png").write_bytes(png)
            print(f"screenshots of each state: {tmp_path}")
        context.close()


# --- the API, asked directly, to compare with what the page shows ------------------------


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def api_predict(base: str, model: str, data: bytes, name: str = "x.png") -> dict:
    body, content_type = multipart_body(data, name)
    request = urllib.request.Request(
        f"{base}/predict?model={model}&top_k=5&resize=true",
        data=body,
        headers={"Content-Type": content_type},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["predictions"][0]


def png(pixels: np.ndarray) -> bytes:
    return encode(pixels)


def larger(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))


def column(card, model_id: str):
    return card.locator(f'.model-result[data-model-id="{model_id}"]')


# --- the tests ---------------------------------------------------------------------------------


def test_page_loads_from_the_service_with_the_model_cards(visit, base_url):
    response = visit.open()
    page = visit.page
    assert "default-src 'self'" in response.headers["content-security-policy"]
    listing = get_json(f"{base_url}/models")
    cards = page.locator("#cards .card")
    visit.expect(cards).to_have_count(len(listing["models"]))
    for info in listing["models"]:
        card = page.locator(f'#cards .card[data-model-id="{info["model_id"]}"]')
        visit.expect(card).to_contain_text(f"{info['parameter_count']:,}")
        visit.expect(card).to_contain_text(info["file"])
        visit.expect(card).to_contain_text("Training")
        training = card.locator("h4:has-text('Training') + dl")  # in words, not raw JSON
        visit.expect(training).to_contain_text("Differs from default")
        visit.expect(training).not_to_contain_text("{")
        if "version" in info:
            visit.expect(card).to_contain_text(str(info["version"]))
        top1 = info["evaluation"]["top1_accuracy"]
        visit.expect(card).to_contain_text(f"{top1 * 100:.1f} %")
    visit.expect(page.locator(f'#cards .card[data-model-id="{LARGE}"]')).to_contain_text(
        "No report for this model yet"
    )
    report = page.get_by_role("link", name=f"Read the report of {SMALL}")
    visit.expect(report).to_have_attribute("href", f"models/{SMALL}/report")
    visit.expect(page.get_by_role("link", name="API documentation (/docs)")).to_be_visible()
    visit.state("cards")
    report.click()
    visit.expect(page.get_by_role("heading", name="Test report")).to_be_visible()
    visit.assert_only_local()


def test_upload_shows_the_32x32_input_five_bars_and_the_superclass_like_the_api(visit, base_url):
    visit.open()
    pixels = larger(make_images(np.array([42]), seed=5)[0], 96, 64)  # not square: cropped
    data = png(pixels)
    visit.upload(("wide.png", data, "image/png"))
    card = visit.finished(1).first
    visit.expect(card.locator(".name")).to_have_text("wide.png")
    visit.expect(card.locator(".meta")).to_contain_text(f"96{X}64 px")
    for model_id in (LARGE, SMALL):
        expected = api_predict(base_url, model_id, data)
        got = column(card, model_id)
        rows = got.locator(".bar-row")
        visit.expect(rows).to_have_count(5)
        for row, want in zip(rows.all(), expected["top_k"], strict=True):
            assert row.get_attribute("data-label") == want["label"]
            assert float(row.get_attribute("data-probability")) == pytest.approx(
                want["probability"]
            )
            text = row.inner_text()
            assert want["label"].replace("_", " ") in text
            assert (f"{want['probability'] * 100:.1f} %" in text) or "<0.1 %" in text
            width = row.locator(".fill").evaluate("e => e.getBoundingClientRect().width")
            track = row.locator(".bar").evaluate("e => e.getBoundingClientRect().width")
            assert width == pytest.approx(track * want["probability"], abs=1.5)
        superclass = got.locator(".superclass")
        assert superclass.get_attribute("data-label") == expected["superclass"]["label"]
        assert float(superclass.get_attribute("data-probability")) == pytest.approx(
            expected["superclass"]["probability"]
        )
        visit.expect(superclass).to_contain_text(
            f"{expected['superclass']['probability'] * 100:.1f} %"
        )
        visit.expect(got.locator(".timing")).to_contain_text(" ms")
    # What the model gets: 32x32, shown enlarged with hard pixel edges, close to the service's
    # own decode (the page's canvas is a preview: the browser resamples, not Pillow).
    canvas = card.locator(".seen canvas")
    size = canvas.evaluate(
        "c => [c.width, c.height, c.clientWidth, getComputedStyle(c).imageRendering]"
    )
    assert size[:2] == [32, 32] and size[2] >= 96 and size[3] == "pixelated"
    preview = np.array(
        canvas.evaluate("c => Array.from(c.getContext('2d').getImageData(0, 0, 32, 32).data)"),
        dtype=np.float64,
    ).reshape(32, 32, 4)[..., :3]
    served = decode(open_image(data, True, 1 << 24), resize=True).astype(np.float64)
    assert np.abs(preview - served).mean() < 12
    visit.assert_only_local()


def test_a_32x32_picture_is_previewed_exactly(visit):
    visit.open()
    pixels = make_images(np.array([7]), seed=3)[0]
    visit.upload(("small.png", png(pixels), "image/png"))
    card = visit.finished(1).first
    preview = card.locator(".seen canvas").evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, 32, 32).data)"
    )
    np.testing.assert_array_equal(np.array(preview).reshape(32, 32, 4)[..., :3], pixels)
    visit.assert_only_local()


def test_both_models_side_by_side_and_their_disagreement_marked(visit, base_url):
    images = make_images(np.arange(0, 100, 9), seed=21)
    files = [(f"synthetic{i}.png", png(image), "image/png") for i, image in enumerate(images)]
    firsts = {
        name: [api_predict(base_url, m, data)["top_k"][0]["label"] for m in (LARGE, SMALL)]
        for name, data, _ in files
    }
    disagreeing = [name for name, (a, b) in firsts.items() if a != b]
    assert disagreeing, "the two test models agree on every image: nothing to show"
    visit.open()
    visit.upload(*files)
    cards = visit.finished(len(files))
    for card in cards.all():
        name = card.locator(".name").inner_text()
        large, small = firsts[name]
        assert card.get_attribute("data-agree") == str(large == small).lower(), name
        verdict = card.locator(".verdict")
        if large == small:
            visit.expect(verdict).to_contain_text(f"Both models say {large.replace('_', ' ')}")
            continue
        visit.expect(verdict).to_contain_text("The models disagree")
        visit.expect(verdict).to_contain_text(f"{LARGE} says {large.replace('_', ' ')}")
        visit.expect(verdict).to_contain_text(f"{SMALL} says {small.replace('_', ' ')}")
        for model_id, own in ((LARGE, large), (SMALL, small)):
            disputed = column(card, model_id).locator(".bar-row.disputed")
            visit.expect(disputed).to_have_attribute("data-label", own)
    card = cards.filter(has_text="The models disagree").first
    card.scroll_into_view_if_needed()
    visit.state("disagreement")
    left = column(card, LARGE).bounding_box()
    right = column(card, SMALL).bounding_box()
    assert abs(left["y"] - right["y"]) < 2 and left["x"] + left["width"] <= right["x"]
    visit.assert_only_local()


def test_errors_are_shown_in_words(visit):
    visit.open()
    visit.upload(("notes.txt", b"just some text, not a picture", "text/plain"))
    card = visit.finished(1).first
    alert = card.get_by_role("alert")
    visit.expect(alert).to_contain_text("Not accepted")
    visit.expect(alert).to_contain_text("not an image we can read")
    visit.expect(card.locator(".no-preview").first).to_be_visible()

    noise = np.random.default_rng(0).integers(0, 256, size=(200, 240, 3), dtype=np.uint8)
    data = png(noise)
    assert len(data) > UPLOAD_LIMIT
    visit.upload(("noise.png", data, "image/png"))
    cards = visit.finished(2)
    big = cards.filter(has_text="noise.png")
    visit.expect(big.get_by_role("alert")).to_contain_text("Too large")
    visit.expect(big.get_by_role("alert")).to_contain_text(f"{UPLOAD_LIMIT:,}")
    visit.state("too-large")
    # The way out offered: a copy cropped and shrunk by the browser, which the service takes.
    big.get_by_role("button", name=f"Send a 128{X}128 copy made by your browser").click()
    visit.expect(big.locator(".bar-row")).to_have_count(10)
    visit.expect(big.locator(".meta")).to_contain_text(f"sent as a 128{X}128 PNG copy")
    visit.expect(visit.page.get_by_role("heading", name="CIFAR-100 classifier")).to_be_visible()
    visit.assert_only_local()


def test_keyboard_and_screen_reader(visit):
    visit.open()
    page = visit.page
    picker = page.get_by_label("Choose images")
    visit.expect(picker).to_have_attribute("type", "file")
    visit.expect(page.get_by_role("status")).to_have_count(1)
    reached = []
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.append(
            page.evaluate("document.activeElement.id || document.activeElement.innerText")
        )
        if reached[-1] == "Sun":
            break
    assert "files" in reached and reached[-1] == "Sun", reached
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    page.keyboard.press("Enter")
    card = visit.finished(1).first
    visit.expect(card.locator(".name")).to_have_text("sun.png")
    visit.expect(page.get_by_role("status")).to_contain_text("sun.png")
    canvas = card.locator(".seen canvas")
    assert "32 by 32" in canvas.get_attribute("aria-label")
    for img in page.locator("img").all():
        assert img.get_attribute("alt") is not None
    visit.assert_only_local()


def test_phone_sized_screen(phone):
    phone.open()
    page = phone.page
    page.get_by_role("button", name="Boat").click()
    card = phone.finished(1).first
    visit_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert visit_width[0] <= visit_width[1], visit_width
    first, second = (column(card, m).bounding_box() for m in (LARGE, SMALL))
    assert second["y"] >= first["y"] + first["height"] - 1  # stacked, not squeezed
    phone.assert_only_local()


@pytest.fixture(scope="module")
def empty_base_url(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no-models")
    with service_server(models_dir=empty, reports_dir=empty) as base:
        yield base


@pytest.fixture
def bare(browser, empty_base_url, request, tmp_path):
    yield from _visit(browser, empty_base_url, request, tmp_path, {"width": 1280, "height": 900})


def test_a_service_without_models_says_so_in_words(bare):
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{bare.base}/health/ready", timeout=5)
    bare.page.goto(bare.base + "/")
    bare.expect(bare.page.locator("#service-error")).to_contain_text("No model is loaded")
    bare.state("no-models")
    bare.page.get_by_role("button", name="Apple").click()
    card = bare.finished(1).first
    bare.expect(card.get_by_role("alert")).to_contain_text("The service is not ready")
    bare.assert_only_local()


KEY = "page-test-key"


@pytest.fixture(scope="module")
def keyed_base_url(models_dir, reports_dir):
    with service_server(models_dir=models_dir, reports_dir=reports_dir, api_keys=KEY) as base:
        yield base


@pytest.fixture
def keyed(browser, keyed_base_url, request, tmp_path):
    yield from _visit(browser, keyed_base_url, request, tmp_path, {"width": 1280, "height": 900})


def test_a_service_with_api_keys_asks_for_one_and_uses_it(keyed):
    page = keyed.page
    page.goto(keyed.base + "/")
    keyed.expect(page.locator("#service-error")).to_contain_text("needs an API key")
    field = page.get_by_label("API key")
    keyed.expect(field).to_be_focused()
    keyed.state("asks-for-a-key")
    field.fill("a-wrong-key")
    page.get_by_role("button", name="Use this key").click()
    keyed.expect(page.locator("#service-error")).to_contain_text("was not accepted")
    keyed.expect(field).to_be_visible()
    field.fill(KEY)
    page.get_by_role("button", name="Use this key").click()
    keyed.expect(page.locator("#cards .card")).to_have_count(2)
    keyed.expect(page.locator("#service-error")).to_be_hidden()
    keyed.expect(field).to_be_hidden()
    page.get_by_role("button", name="Apple").click()
    card = keyed.finished(1).first
    keyed.expect(card.locator(".bar-row")).to_have_count(10)  # five per model
    curl = card.locator("details.raw pre").first.text_content()
    assert "Authorization: Bearer $API_KEY" in curl and KEY not in curl
    page.reload()  # the key lives as long as the tab
    keyed.expect(page.locator("#cards .card")).to_have_count(2)
    keyed.expect(field).to_be_hidden()
    keyed.assert_only_local()


def test_static_files_are_served_and_nothing_else(base_url):
    for path in ("/static/app.js", "/static/page.css", "/static/samples/sun.png"):
        with urllib.request.urlopen(base_url + path, timeout=10) as response:
            assert response.status == 200
    sample = Image.open(
        io.BytesIO(urllib.request.urlopen(base_url + "/static/samples/tree.png").read())
    )
    assert sample.size == (32, 32)
    for path in ("/static/make_samples.py", "/static/../main.py", "/static/%2e%2e/main.py"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base_url + path, timeout=10)
        assert err.value.code == 404, path
