"""Shared fixtures: small generated image folders (the suite never needs ../shared)."""

import os
import signal

import pytest

from testkit import CHROMIUM, CHROMIUM_FLAGS, make_shapes, run_cli


def pytest_configure(config):
    """A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would every
    command it starts: with a handler here, those commands start with the default again (Ctrl-C tests observe it)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the decode cache (and downloads) of the whole run, subprocesses included, in a temp folder."""
    os.environ["FOLDERCNN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def shapes_dirs(tmp_path_factory):
    """(train, test) folders of circles, squares and triangles."""
    base = tmp_path_factory.mktemp("shapes")
    return make_shapes(base / "train", per_class=40, seed=1), make_shapes(base / "test", per_class=15, seed=2)


@pytest.fixture(scope="session")
def trained_model(shapes_dirs, tmp_path_factory):
    """A fast-recipe model trained for a few epochs on the shapes (shared by several tests)."""
    import foldercnn

    out = tmp_path_factory.mktemp("run")
    result = foldercnn.train(shapes_dirs[0], out, recipe="fast", epochs=8, image_size=32, seed=0, log=lambda *a: None)
    return result


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright. Skipped (with the reason) where it is not installed,
    except under CI, whose .ci/run installs it: there a missing browser is a failure."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not on PATH; .ci/run should have installed Debian's chromium")
        pytest.skip("browser tests need Debian's chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()
