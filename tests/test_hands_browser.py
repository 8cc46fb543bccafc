"""The serve page with a hand-landmark model, in Chromium: the 21-point skeleton drawn over an upload in which a
hand is found, "no hand found" for a photo without one. Needs a photo of a hand: the Rock-Paper-Scissors
validation photos ($FOLDERCNN_RPS_DIR)."""

import os
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect

from foldercnn.data import hands
from test_serve_browser import VIEWPORTS, screenshot
from testkit import running_server, untrained_hand_model

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not hands.available(), reason="onnxruntime is not installed (foldercnn[hands])"),
]


@pytest.fixture(scope="module")
def hand_photo():
    root = os.environ.get("FOLDERCNN_RPS_DIR")
    if not root:
        pytest.skip("set FOLDERCNN_RPS_DIR: the test needs a photo of a hand")
    return sorted((Path(root) / "validation" / "scissors").glob("*.png"))[0]


@pytest.fixture(scope="module")
def hand_server(tmp_path_factory):
    path = untrained_hand_model(tmp_path_factory.mktemp("hands") / "model.safetensors")
    with running_server(path, log=tmp_path_factory.mktemp("hands-browser") / "server.log") as s:
        yield s


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_the_skeleton_is_drawn_and_no_hand_is_said(browser, hand_server, hand_photo, tmp_path, viewport):
    from skimage import data

    cat = tmp_path / "cat.jpg"
    Image.fromarray(data.chelsea()).save(cat)
    page = browser.new_page(viewport=VIEWPORTS[viewport])
    try:
        page.goto(hand_server.url + "/")
        page.wait_for_selector("#classes li", timeout=15_000)
        page.set_input_files("#file-input", [str(hand_photo), str(cat)])
        expect(page.locator("#results .card.pending")).to_have_count(0, timeout=60_000)
        found = page.locator("#results .card", has_text=hand_photo.name)
        expect(found.locator("svg.skeleton")).to_have_count(1)
        assert found.locator("svg.skeleton circle").count() == 21
        assert found.locator("svg.skeleton line").count() == len(hands.SKELETON)
        box = found.locator(".thumb img").bounding_box()
        dots = [found.locator("svg.skeleton circle").nth(i).bounding_box() for i in range(21)]
        assert all(
            box["x"] <= d["x"] <= box["x"] + box["width"] and box["y"] <= d["y"] <= box["y"] + box["height"]
            for d in dots
        ), "the points lie on the picture"
        none = page.locator("#results .card", has_text="cat.jpg")
        assert "No hand found" in none.inner_text() and none.locator("svg.skeleton").count() == 0
        assert none.locator(".prob").count() == 0
        screenshot(page, tmp_path / f"serve-hands-{viewport}.png")
    finally:
        page.close()
