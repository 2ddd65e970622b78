"""The demo as a person uses it: start `opendino demo --backbone debug` as a real server, drive its page in headless
Chromium (the system's `chromium` through Playwright's Python package; no browser download), upload an image, wait
for the pictures, click a patch, pick an example as the second image, see the matches, try a bad file; every request
the page makes must go to the demo server itself. Screenshots go to the test's tmp folder (and to
$OPENDINO_SCREENSHOTS when set).

Skips, saying what to install, without Playwright (`pip install playwright`, in the dev extra) or without a Chromium
binary (Debian: `apt-get install chromium`; or set OPENDINO_CHROMIUM to a Chromium executable)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

IMAGE_SIZE = 64  # the server's --image-size: debug patches of 8 px
START_TIMEOUT = 60  # seconds for `opendino demo` to answer
WAIT_MS = 30_000  # longest wait for one step of the page


def _chromium() -> str:
    """The Chromium executable to drive, or a skip naming what to install."""
    candidates = [os.environ.get("OPENDINO_CHROMIUM", "")] + [
        shutil.which(name) or "" for name in ("chromium", "chromium-browser", "google-chrome")
    ]
    for path in filter(None, candidates):
        try:
            done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"the browser test needs a working Chromium: {path} does not run ({e})")
        if done.returncode == 0:
            return path
        pytest.skip(f"the browser test needs a working Chromium: `{path} --version` failed: {done.stderr[-300:]}")
    pytest.skip("the browser test needs Chromium: apt-get install chromium (Debian), or set OPENDINO_CHROMIUM")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser test needs Playwright: pip install playwright (in the dev extra)"
    )
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`opendino demo` in a subprocess on a free port; its URL once it answers."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    command = [sys.executable, "-m", "opendino", "demo", "--backbone", "debug", "--port", str(port),
               "--image-size", str(IMAGE_SIZE), "--max-upload-mb", "1", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"`opendino demo` exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url + "api/info", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`opendino demo` did not answer within {START_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _photo(path: Path, width: int, height: int) -> Path:
    """A textured picture with a disc in the middle."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((height, width, 3)) * 80 + 40).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(width, height) / 3) ** 2
    pixels[disc] = (230, 180, 40)
    Image.fromarray(pixels).save(path)
    return path


def _natural_size(page, selector: str) -> list[int]:
    """[width, height] of an image once it has loaded."""
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
        timeout=WAIT_MS,
    )
    return page.eval_on_selector(selector, "i => [i.naturalWidth, i.naturalHeight]")


def _screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    folder = os.environ.get("OPENDINO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, Path(folder) / name)


def test_the_page_in_chromium(server, browser, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    own = urlsplit(server)
    requested, refused, crashes = [], [], []

    def only_the_demo_server(route):
        parts = urlsplit(route.request.url)
        if parts.scheme in ("data", "blob") or (parts.hostname, parts.port) == (own.hostname, own.port):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route("**/*", only_the_demo_server)
    page = context.new_page()
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: crashes.append(str(error)))
    page.goto(server)
    expect(page.locator("#backbone")).to_contain_text("debug (random weights, seed 0)")

    # ---- upload an image: 120 x 80 px -> 96 x 64 px fed to the backbone (12 x 8 patches)
    page.set_input_files("#file-a", str(_photo(tmp_path / "disc.png", 120, 80)))
    expect(page.locator("#results-a h2")).to_contain_text("Image A: disc.png")
    for view in ("input", "foreground", "pca", "attention"):
        assert _natural_size(page, f"#results-a img[data-view={view}]") == [96, 64], view
    assert page.locator("#results-a .heads img").count() == 3  # the debug backbone's heads
    expect(page.locator("#results-a .facts")).to_contain_text("12×8 patches of 8 px")
    expect(page.locator("#error")).to_be_hidden()

    # ---- click a patch: three quarters across, a quarter down -> row 2, column 9
    sim_a = page.locator("#sim-a")
    assert _natural_size(page, "#sim-a") == [96, 64]
    before = sim_a.get_attribute("src")
    box = sim_a.bounding_box()
    sim_a.click(position={"x": box["width"] * 0.76, "y": box["height"] * 0.26})
    expect(sim_a).to_have_attribute("data-version", "1")
    expect(page.locator("#sim-a-caption")).to_contain_text("patch (row 2, column 9)")
    assert sim_a.get_attribute("src") != before and _natural_size(page, "#sim-a") == [96, 64]
    expect(page.locator("#sim-colorbar")).to_be_visible()

    # ---- a bundled example as image B: the matches, and similarity across the two images
    page.select_option("#example-b", "chelsea.jpg")  # 451 x 300 -> 96 x 64
    expect(page.locator("#results-b h2")).to_contain_text("Image B: chelsea.jpg")
    expect(page.locator("#match-section")).to_be_visible()
    assert _natural_size(page, "#match-img") == [96 + 16 + 96, 64]
    expect(page.locator("#match-facts")).to_contain_text("mutual nearest neighbours")
    sim_a.click(position={"x": 5, "y": 5})
    expect(page.locator("#sim-b")).to_have_attribute("data-version", "1")
    expect(page.locator("#sim-b-caption")).to_contain_text("most similar patch")
    page.wait_for_function("() => document.body.dataset.pending === '0'", timeout=WAIT_MS)
    _screenshot(page, tmp_path, "demo_debug.png")

    # ---- refused files: the server's reason on the page, nothing left half-shown, the page still works
    (tmp_path / "notes.txt").write_text("not an image\n")
    page.set_input_files("#file-a", str(tmp_path / "notes.txt"))
    expect(page.locator("#error")).to_contain_text("image A: notes.txt: not a recognised image format")
    expect(page.locator("#results-a")).to_have_count(0)
    expect(page.locator("#match-section")).to_be_hidden()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big, "PNG")
    (tmp_path / "big.png").write_bytes(big.getvalue())  # about 1.4 MB > --max-upload-mb 1
    page.set_input_files("#file-a", str(tmp_path / "big.png"))
    expect(page.locator("#error")).to_contain_text("is larger than the limit of 1.0 MB")
    _screenshot(page, tmp_path, "demo_debug_error.png")
    page.set_input_files("#file-a", str(tmp_path / "disc.png"))
    expect(page.locator("#error")).to_be_hidden()
    assert _natural_size(page, "#results-a img[data-view=pca]") == [96, 64]
    page.wait_for_function("() => document.body.dataset.pending === '0'", timeout=WAIT_MS)

    context.close()
    assert not crashes, crashes
    assert not refused, f"the page asked other hosts: {refused}"
    hosts = {(urlsplit(u).hostname, urlsplit(u).port) for u in requested if urlsplit(u).scheme in ("http", "https")}
    assert hosts == {(own.hostname, own.port)}, hosts
