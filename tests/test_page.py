"""The page at /, in a real browser: Debian's chromium, driven by Playwright, against the real
service under uvicorn on a loopback port. On failure, a screenshot of every state the test
reached is written to its tmp_path (NN-state.png)."""

import contextlib
import io
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from bench.load import multipart_body
from bench.servers import service_process
from contract.images import decode, open_image
from contract.modelcard import FAMILIARITY_NAME, INPUT_NAME
from tests.service_helpers import encode
from tests.synthetic import make_images
from training import scores

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
UNFAMILIAR_BELOW = 0.01  # the page warns below this familiarity (stranger than 99 %)


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

    def settled(self) -> None:
        """No heat map still being worked out: the page has nothing in flight, so a test's
        own call to the API is batched alone, as the page's were."""
        self.expect(self.page.locator('.heat[data-state="loading"]')).to_have_count(0)

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


def api_explain(base: str, model: str, data: bytes, class_id: int | None = None) -> dict:
    query = f"model={model}&resize=true" + ("" if class_id is None else f"&class={class_id}")
    body, content_type = multipart_body(data, "x.png", field="file")
    request = urllib.request.Request(
        f"{base}/explain?{query}", data=body, headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["explanations"][0]


def file_familiarity(models_dir: Path, model: str, images: list[bytes]) -> np.ndarray:
    """The familiarity output of the model file itself (onnxruntime, no service) for these
    uploads, decoded as the service decodes them with resize=true."""
    session = ort.InferenceSession(models_dir / f"{model}.onnx", providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert FAMILIARITY_NAME in names, f"{model}.onnx has no familiarity output: {names}"
    batch = np.stack([decode(open_image(data, True, 1 << 24)) for data in images])
    return session.run([FAMILIARITY_NAME], {INPUT_NAME: batch})[0][:, 0]


def png(pixels: np.ndarray) -> bytes:
    return encode(pixels)


def larger(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))


def column(card, model_id: str):
    return card.locator(f'.model-result[data-model-id="{model_id}"]')


def pixels_of(canvas) -> np.ndarray:
    """What a canvas holds, read back from the browser: uint8 [height, width, 4]."""
    width, height, data = canvas.evaluate(
        "c => [c.width, c.height,"
        " Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]"
    )
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)


def drawn_heat(visit, heat) -> tuple[int, np.ndarray, np.ndarray]:
    """A drawn heat map: (class explained, the map the page holds, the canvas's pixels),
    once the page says it is done."""
    visit.expect(heat).to_have_attribute("data-state", "done")
    held = np.array(json.loads(heat.get_attribute("data-heat-map")), dtype=np.float64)
    return int(heat.get_attribute("data-class-id")), held, pixels_of(heat.locator(".heat-map"))


def assert_heat_pixels(pixels: np.ndarray, heat: np.ndarray) -> None:
    """The canvas is the map: opacity in proportion to the change (the largest opaque), red
    where covering lowered the class's probability and blue where it raised it."""
    assert pixels.shape == (32, 32, 4)
    scale = np.abs(heat).max()
    if scale == 0:  # covering changed nothing: nothing drawn, the picture shows as it is
        assert not pixels[..., 3].any()
        return
    alpha = pixels[..., 3].astype(np.float64)
    np.testing.assert_allclose(alpha, np.abs(heat) / scale * 255, atol=1.01)
    strong = alpha > 128
    red, blue = pixels[..., 0].astype(int), pixels[..., 2].astype(int)
    assert strong.any()
    assert (red[strong & (heat > 0)] > blue[strong & (heat > 0)] + 100).all()
    assert (blue[strong & (heat < 0)] > red[strong & (heat < 0)] + 100).all()


def assert_each_training_field_once(training, detail: dict) -> None:
    """The card's Training list says each fact once: where the method (Recipe.method in
    training/recipe.py) puts recipe fields in words, those fields are not listed again raw."""
    labels = [text.strip() for text in training.locator("dt").all_inner_texts()]
    assert len(labels) == len(set(labels)), labels  # not "Optimizer" from both
    values = [text.strip() for text in training.locator("dd").all_inner_texts()]
    shown = dict(zip(labels, values, strict=True))
    recipe, method = detail["training"]["recipe"], detail["training"]["method"]
    # The words, shown, and holding the raw values they replace.
    assert shown["Optimizer"] == method["optimizer"]
    assert shown["Learning-rate schedule"] == method["schedule"]
    assert shown["Augmentation"] == method["augmentation"]
    assert shown["Dropout"] == method["dropout"]
    assert str(recipe["learning_rate"]) in method["schedule"]
    assert f"{recipe['conv_dropout']} after conv" in method["dropout"]
    assert f"{recipe['dense_dropout']} after dense" in method["dropout"]
    # The raw fields those words describe, not listed a second time.
    raw = {"Weight decay", "Learning rate", "Conv dropout", "Dense dropout", "Mixed precision"}
    raw |= {"Deterministic", "Steps per execution", "Held out classes"}
    assert not raw & set(labels), labels
    # The recipe fields no words describe are still there.
    assert shown["Epochs"] == str(recipe["epochs"])
    assert shown["Batch size"] == str(recipe["batch_size"])
    assert shown["Seed"] == str(recipe["seed"])


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
        visit.expect(card).to_contain_text(f"Provenance{info['provenance']}")  # not verified
        visit.expect(card).to_contain_text("Training")
        training = card.locator("h4:has-text('Training') + dl")  # in words, not raw JSON
        visit.expect(training).to_contain_text("Differs from default")
        visit.expect(training).not_to_contain_text("{")
        detail = get_json(f"{base_url}/models/{info['model_id']}")
        assert_each_training_field_once(training, detail)
        # Which score the familiarity output calibrates, in the card's words.
        assert detail["familiarity"]["score"] == scores.DEFAULT
        visit.expect(card).to_contain_text(detail["familiarity"]["method"])
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
    visit.settled()
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
    served = decode(open_image(data, True, 1 << 24)).astype(np.float64)
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


def test_the_heat_map_shows_where_each_model_looked_for_its_class_and_any_other(visit, base_url):
    pixels = make_images(np.array([42]), seed=5)[0]
    data = png(pixels)
    # Preconditions, from the API itself: the small model's answers move when parts of the
    # picture are covered (the large one, one epoch old, may say ~1 % for everything).
    ranked = api_predict(base_url, SMALL, data)["top_k"]
    top, second = ranked[0]["class_id"], ranked[1]["class_id"]
    for class_id in (top, second):
        assert np.abs(api_explain(base_url, SMALL, data, class_id)["heat_map"]).max() > 0
    visit.open()
    visit.upload(("looked.png", data, "image/png"))
    card = visit.finished(1).first
    visit.settled()
    seen = pixels_of(card.locator(".seen canvas"))
    for model_id in (LARGE, SMALL):
        got = column(card, model_id)
        heat = got.locator(".heat")
        class_id, held, drawn = drawn_heat(visit, heat)
        expected = api_explain(base_url, model_id, data)
        first = api_predict(base_url, model_id, data)["top_k"][0]
        assert class_id == expected["class_id"] == first["class_id"]  # the top class by default
        np.testing.assert_allclose(held, np.array(expected["heat_map"]), atol=1e-4)
        assert_heat_pixels(drawn, held)
        # Over the 32x32 picture the model gets, enlarged with hard pixel edges, the same
        # size and place as the picture beneath, which shows through.
        canvas, base = heat.locator(".heat-map"), heat.locator(".heat-base")
        assert canvas.bounding_box() == base.bounding_box()
        assert canvas.bounding_box()["width"] >= 96
        look = canvas.evaluate(
            "c => [getComputedStyle(c).imageRendering, +getComputedStyle(c).opacity]"
        )
        assert look[0] == "pixelated" and 0 < look[1] < 1
        np.testing.assert_array_equal(pixels_of(base), seen)
        label = first["label"].replace("_", " ")
        visit.expect(heat.locator(".heat-title")).to_contain_text(f"looked for {label}")
        legend = heat.locator(".legend")
        visit.expect(legend).to_contain_text("Red: covering this part lowered the probability")
        visit.expect(legend).to_contain_text("Blue: covering it raised the probability")
        scale = np.abs(held).max()
        description = canvas.get_attribute("aria-label")
        if scale:
            visit.expect(legend).to_contain_text(f"{scale * 100:.1f} percentage points")
            assert "lowered its probability most" in description, description
        else:
            visit.expect(legend).to_contain_text("none: covering any part changed")
            assert "made no difference" in description, description
        visit.expect(got.locator('.bar-pick[aria-pressed="true"]')).to_have_count(1)
        visit.expect(got.locator(".bar-row").first.locator(".bar-pick")).to_have_attribute(
            "aria-pressed", "true"
        )
    visit.state("heat-maps")

    # Another of the top 5, clicked: its own map, drawn in place of the first.
    got = column(card, SMALL)
    heat = got.locator(".heat")
    _, before, drawn_before = drawn_heat(visit, heat)
    row = got.locator(f'.bar-row[data-class-id="{second}"]')
    row.locator(".bar-pick").click()
    visit.expect(heat).to_have_attribute("data-class-id", str(second))
    class_id, held, drawn = drawn_heat(visit, heat)
    expected = api_explain(base_url, SMALL, data, second)
    np.testing.assert_allclose(held, np.array(expected["heat_map"]), atol=1e-4)
    assert not np.allclose(held, before, atol=1e-4)
    assert_heat_pixels(drawn, held)
    assert not np.array_equal(drawn, drawn_before)
    visit.expect(row.locator(".bar-pick")).to_have_attribute("aria-pressed", "true")
    visit.expect(got.locator('.bar-pick[aria-pressed="true"]')).to_have_count(1)
    label = expected["label"].replace("_", " ")
    visit.expect(heat.locator(".heat-title")).to_contain_text(f"looked for {label}")
    visit.state("another-class")

    # Any class at all, from the list: one outside this model's top 5.
    shown = {int(r.get_attribute("data-class-id")) for r in got.locator(".bar-row").all()}
    outside = next(i for i in range(100) if i not in shown)
    got.get_by_label("Explain another class").select_option(str(outside))
    visit.expect(heat).to_have_attribute("data-class-id", str(outside))
    class_id, held, drawn = drawn_heat(visit, heat)
    np.testing.assert_allclose(
        held, np.array(api_explain(base_url, SMALL, data, outside)["heat_map"]), atol=1e-4
    )
    assert_heat_pixels(drawn, held)
    visit.expect(got.locator('.bar-pick[aria-pressed="true"]')).to_have_count(0)
    # The opacity is the reader's to choose: the picture beneath shows through more or less.
    got.get_by_label(f"Heat map opacity for {SMALL}").fill("30")
    opacity = heat.locator(".heat-map").evaluate("c => +getComputedStyle(c).opacity")
    assert opacity == pytest.approx(0.3)
    visit.assert_only_local()


def candidates() -> dict[str, bytes]:
    """Pictures from like the tests' training data (synthetic 4x4-block templates) to unlike
    it: each blended with more uniform noise. Which is which is asked of the model files,
    never assumed."""
    noise = np.random.default_rng(7).integers(0, 256, (32, 32, 3)).astype(np.float64)
    pictures = {"noise.png": png(noise.astype(np.uint8))}
    classes = range(0, 100, 9)
    for c, image in zip(classes, make_images(np.array(classes), seed=40), strict=True):
        for share in (0.0, 0.1, 0.2, 0.3):
            blend = np.clip((1 - share) * image + share * noise, 0, 255).astype(np.uint8)
            pictures[f"class{c}-noise{share:.1f}.png"] = png(blend)
    return pictures


def test_an_unfamiliar_picture_is_flagged_in_words_and_a_familiar_one_is_not(
    visit, base_url, models_dir
):
    pictures = candidates()
    names = list(pictures)
    scores = {
        m: dict(zip(names, file_familiarity(models_dir, m, list(pictures.values())), strict=True))
        for m in (LARGE, SMALL)
    }
    highest = {n: max(scores[m][n] for m in scores) for n in names}
    lowest = {n: min(scores[m][n] for m in scores) for n in names}
    # The pictures nearest the threshold on either side that are still clearly on it for
    # both models (a few validation images of margin: the service batches, the file alone
    # does not, and a rounding may move a picture by a rank).
    below = [n for n in names if highest[n] < UNFAMILIAR_BELOW - 0.004]
    above = [n for n in names if lowest[n] >= UNFAMILIAR_BELOW + 0.004]
    assert below, f"no candidate is unfamiliar to both models: {scores}"
    assert above, f"no candidate is familiar to both models: {scores}"
    strange, familiar = max(below, key=highest.get), min(above, key=lowest.get)

    visit.open()
    # One at a time, so that the status line (one live region) speaks of each in turn.
    status = visit.page.get_by_role("status")
    visit.upload((strange, pictures[strange], "image/png"))
    visit.finished(1)
    visit.expect(status).to_contain_text(f"{strange}: ")
    visit.expect(status).to_contain_text("but the picture is unlike its training data")
    visit.upload((familiar, pictures[familiar], "image/png"))
    cards = visit.finished(2)
    visit.expect(status).to_contain_text(f"{familiar}: ")
    visit.expect(status).not_to_contain_text("unlike")
    visit.settled()
    strange_card = cards.filter(has_text=strange)
    familiar_card = cards.filter(has_text=familiar)
    for model_id in (LARGE, SMALL):
        expected = api_predict(base_url, model_id, pictures[strange])["familiarity"]
        assert expected == pytest.approx(scores[model_id][strange], abs=0.003)
        got = column(strange_card, model_id)
        warning = got.locator(".familiarity.unfamiliar")
        visit.expect(warning).to_be_visible()
        assert float(warning.get_attribute("data-familiarity")) == pytest.approx(expected)
        visit.expect(warning).to_contain_text(
            "This image is unlike the images the model was trained on"
        )
        if expected:
            stranger = f"{np.floor((1 - expected) * 1000 + 1e-6) / 10:.1f} %"
        else:
            stranger = "every one"
        visit.expect(warning).to_contain_text(f"stranger than {stranger} of the validation images")
        visit.expect(warning).to_contain_text("don't trust this answer")
        # Above the answer it casts doubt on.
        assert warning.bounding_box()["y"] < got.locator(".bars").bounding_box()["y"]

        got = column(familiar_card, model_id)
        expected = api_predict(base_url, model_id, pictures[familiar])["familiarity"]
        assert expected == pytest.approx(scores[model_id][familiar], abs=0.003)
        visit.expect(got.locator(".familiarity.unfamiliar")).to_have_count(0)
        note = got.locator(".familiarity")
        visit.expect(note).to_have_count(1)
        assert float(note.get_attribute("data-familiarity")) == pytest.approx(expected)
        visit.expect(note).to_contain_text("of the validation images")
        said = re.search(r"more like the training data than ([\d.]+) %", note.inner_text())
        assert said and float(said[1]) == pytest.approx(expected * 100, abs=0.51), said
        if expected < 0.05:  # above the threshold, but rare: said with care, not as a warning
            visit.expect(note).to_contain_text("Unusual picture for this model")
        visit.expect(got).not_to_contain_text("unlike the images the model was trained on")
    strange_card.scroll_into_view_if_needed()
    visit.state("unfamiliar")
    visit.assert_only_local()


def test_no_familiarity_and_a_failed_explanation_are_said_in_words(visit):
    """A model exported before familiarity existed answers null: the page claims nothing
    about the picture. An explanation the service refuses is explained, not drawn."""

    def without_familiarity(route):
        response = route.fetch()
        body = response.json()
        for prediction in body["predictions"]:
            prediction["familiarity"] = None
        route.fulfill(response=response, json=body)

    refusals = []

    def refused(route):
        refusals.append(route.request.url)
        route.fulfill(status=503, headers={"Retry-After": "1"}, json={"detail": "too busy"})

    visit.page.route("**/predict?*", without_familiarity)
    visit.page.route("**/explain?*", refused)
    visit.open()
    visit.page.get_by_role("button", name="Tree").click()
    card = visit.finished(1).first
    for model_id in (LARGE, SMALL):
        got = column(card, model_id)
        note = got.locator(".familiarity")
        visit.expect(note).to_have_count(1)
        visit.expect(note).to_have_attribute("data-familiarity", "")
        visit.expect(note).to_contain_text("no familiarity output")
        visit.expect(note).not_to_contain_text("%")
        visit.expect(got).not_to_contain_text("unlike the images")
        visit.expect(got).not_to_contain_text("more like the training data")
        heat = got.locator(".heat")
        visit.expect(heat).to_have_attribute("data-state", "error")
        visit.expect(heat.get_by_role("alert")).to_contain_text("Could not explain the answer")
        visit.expect(heat.get_by_role("alert")).to_contain_text("Try again in 1 s")
    assert len(refusals) == 2 * 3  # each model's, asked again twice after Retry-After
    visit.state("no-familiarity")
    # Asked again once the service takes it: drawn, the error gone.
    visit.page.unroute("**/explain?*")
    got = column(card, SMALL)
    got.locator(".heat").get_by_role("button", name="Try again").click()
    visit.expect(got.locator(".heat")).to_have_attribute("data-state", "done")
    visit.expect(got.locator(".heat").get_by_role("alert")).to_be_hidden()
    visit.expect(got.locator(".heat-title")).to_contain_text("Where the model looked for")
    visit.assert_only_local()


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
