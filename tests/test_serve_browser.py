"""The page of `foldercnn serve` in a real browser: headless Debian Chromium driven by Playwright.

Screenshots go to the test's tmp_path; with FOLDERCNN_SCREENSHOTS=DIR they are also copied there to look at.
"""

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect

import foldercnn
from testkit import CHROMIUM, CHROMIUM_FLAGS, running_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


def screenshot(page, path, full_page=True):
    page.screenshot(path=str(path), full_page=full_page)
    keep = os.environ.get("FOLDERCNN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / Path(path).name)


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    with running_server(trained_model.model_path, log=tmp_path_factory.mktemp("browser") / "server.log") as s:
        yield s


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_upload_through_the_page_shows_each_prediction(browser, server, trained_model, shapes_dirs, tmp_path, viewport):
    model = foldercnn.load(trained_model.model_path)
    images = [sorted((shapes_dirs[1] / kind).glob("*.png"))[2] for kind in ("circle", "triangle")]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture\n")
    size = VIEWPORTS[viewport]
    page = browser.new_page(viewport=size)
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#classes li", timeout=15_000)
        assert page.locator("#classes li").all_inner_texts() == model.classes
        facts = page.locator("#facts").inner_text()
        assert f"{model.image_size} × {model.image_size} px" in facts
        assert "validation, from the training folder: optimistic" in facts  # no evaluation.json beside the model
        screenshot(page, tmp_path / f"serve-{viewport}-empty.png")

        page.set_input_files("#file-input", [str(p) for p in images] + [str(not_an_image)])
        # (locators, not wait_for_function: the page's Content-Security-Policy forbids eval, and it stays on)
        expect(page.locator("#results .card")).to_have_count(3)
        expect(page.locator("#results .card.pending")).to_have_count(0, timeout=30_000)
        for path in images:
            card = page.locator("#results .card", has_text=path.name)
            assert card.locator(".predicted").inner_text() == model.predict(path).label
            assert card.locator(".bars li").count() == len(model.classes)
            assert card.locator("img").evaluate("img => img.naturalWidth") > 0  # the thumbnail is shown
        error = page.locator("#results .card.error")
        assert error.count() == 1 and "notes.png" in error.inner_text() and "not an image" in error.inner_text()
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, "nothing may stick out sideways"
        screenshot(page, tmp_path / f"serve-{viewport}-predictions.png")
        page.click("#clear-button")
        assert page.locator("#results .card").count() == 0
    finally:
        page.close()


def test_unfamiliar_image_is_shown_as_a_guess(browser, trained_model, shapes_dirs, tmp_path):
    """A black or noise frame (a covered or broken camera) scored unfamiliar: its card says so and shows no
    confident percentage; a familiar shape's card does not. The model copy's threshold lies between the two
    images' scores (testkit.unfamiliar_between): what a tiny model learns differs from host to host."""
    from PIL import Image

    from testkit import unfamiliar_between

    frames = [tmp_path / "black.png", tmp_path / "noise.png"]
    Image.new("RGB", (40, 40), "black").save(frames[0])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(frames[1])
    shapes = sorted(shapes_dirs[1].rglob("*.png"))
    path, strange, familiar = unfamiliar_between(trained_model.model_path, frames, shapes, tmp_path / "m.safetensors")
    model = foldercnn.load(path)
    assert model.predict(strange).unfamiliar is True and model.predict(familiar).unfamiliar is False
    with running_server(path, log=tmp_path / "server.log") as server:
        page = browser.new_page(viewport=VIEWPORTS["desktop"])
        try:
            page.goto(server.url + "/")
            page.wait_for_selector("#classes li", timeout=15_000)
            page.set_input_files("#file-input", [str(strange), str(familiar)])
            expect(page.locator("#results .card.pending")).to_have_count(0, timeout=30_000)
            card = page.locator("#results .card", has_text=strange.name)
            assert "This does not look like the training images: the answer is a guess" in card.inner_text()
            assert card.locator(".prob").count() == 0  # no big percentage
            known = page.locator("#results .card", has_text=familiar.name)
            assert "does not look like the training images" not in known.inner_text()
            assert known.locator(".prob").count() == 1
            screenshot(page, tmp_path / "serve-desktop-unfamiliar.png")
        finally:
            page.close()


def test_camera_unavailable_is_said_plainly(browser, server):
    page = browser.new_page()  # no camera in this browser
    try:
        page.goto(server.url + "/")
        page.click("#camera-button")
        expect(page.locator("#camera-message")).to_contain_text("camera", ignore_case=True, timeout=15_000)
        assert page.locator("#camera").is_hidden()
    finally:
        page.close()


def test_camera_frames_are_classified_a_few_times_per_second(browser, server, trained_model, tmp_path):
    """Chromium's fake camera (a moving test pattern) stands in for a webcam."""
    camera_browser = browser.browser_type.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_FLAGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
    )
    try:
        context = camera_browser.new_context(viewport=VIEWPORTS["desktop"], permissions=["camera"])
        page = context.new_page()
        page.goto(server.url + "/")
        page.click("#camera-button")
        expect(page.locator("#camera-card .predicted")).to_have_count(1, timeout=30_000)
        expect(page.locator("#camera-rate")).to_contain_text("frames/s")
        classes = foldercnn.load(trained_model.model_path).classes
        assert page.locator("#camera-card .predicted").inner_text() in classes
        page.wait_for_timeout(1500)  # a few more frames
        rate = float(page.locator("#camera-rate").inner_text().split("·")[1].split()[0])
        assert 0 < rate <= 4, rate  # the page asks for at most ~3 frames a second, however fast the server is
        screenshot(page, tmp_path / "serve-desktop-camera.png", full_page=False)
        assert page.locator("#video-box svg.heatmap").count() == 0
        page.check("#explain-toggle")  # the live frames now come with where the model looked
        expect(page.locator("#video-box svg.heatmap")).to_have_count(1, timeout=15_000)
        expect(page.locator("#video-box svg.heatmap")).to_be_visible()
        screenshot(page, tmp_path / "serve-desktop-camera-explained.png", full_page=False)
        page.click("#camera-button")
        assert page.locator("#camera").is_hidden()
    finally:
        camera_browser.close()


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_where_it_looked_toggle_overlays_the_map_of_the_answer(browser, server, shapes_dirs, tmp_path, viewport):
    image = sorted((shapes_dirs[1] / "triangle").glob("*.png"))[3]
    with open(image, "rb") as f:
        grid = np.array(
            httpx.post(server.url + "/predict?explain=1", files={"files": f}, timeout=30).json()[0]["explanation"][
                "grid"
            ]
        )
    y, x = np.unravel_index(grid.argmax(), grid.shape)
    where = ["top", "middle", "bottom"][min(2, 3 * y // 16)] + " " + ["left", "middle", "right"][min(2, 3 * x // 16)]
    page = browser.new_page(viewport=VIEWPORTS[viewport])
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#classes li", timeout=15_000)
        page.set_input_files("#file-input", [str(image)])
        expect(page.locator("#results .card.pending")).to_have_count(0, timeout=30_000)
        assert page.locator("#results svg.heatmap").count() == 0  # off until asked for
        expect(page.locator("#explain-label")).to_be_visible()
        page.check("#explain-toggle")
        page.set_input_files("#file-input", [str(image)])
        expect(page.locator("#results .card")).to_have_count(2)
        expect(page.locator("#results .card.pending")).to_have_count(0, timeout=30_000)
        heat = page.locator("#results .card").first.locator("svg.heatmap")
        expect(heat).to_be_visible()
        assert heat.get_attribute("aria-label") == "where the model looked most: " + where
        box, img = heat.bounding_box(), page.locator("#results .card").first.locator("img").bounding_box()
        assert abs(box["width"] - img["width"]) < 2 and abs(box["height"] - img["height"]) < 2  # over the picture
        screenshot(page, tmp_path / f"serve-{viewport}-explained.png")
        page.uncheck("#explain-toggle")
        expect(heat).to_be_hidden()
    finally:
        page.close()
