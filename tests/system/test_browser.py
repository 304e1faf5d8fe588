"""The draw-a-digit page in a real headless Chromium, driven as a person would: digits drawn stroke
by stroke on the canvas (mouse, finger and pen), the prediction read off the page.

Needs Debian's `chromium` and `chromium-driver` and selenium (the test extra). Skips cleanly without
them, unless GPUNET_REQUIRE_BROWSER=1 (set by .ci/run), where a missing or broken browser fails.
GPUNET_SCREENSHOT=PATH also saves the page's screenshot there (README's picture:
docs/serve-page.png).
"""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
import threading

import numpy as np
import pytest
from conftest import optional

REQUIRE = os.environ.get("GPUNET_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
)


def _skip_or_fail(reason):
    if REQUIRE:
        pytest.fail(f"GPUNET_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip_or_fail("selenium is not installed (pip install selenium, or the test extra)")
    chromium = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        _skip_or_fail(
            "Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    try:  # the paths are given, so selenium's own driver manager never goes to the network
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except Exception as exc:
        _skip_or_fail(f"Chromium did not start ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    driver.set_page_load_timeout(30)
    driver.set_window_size(860, 760)  # the whole page fits: the screenshot shows all ten bars
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, mnist_model):
    """The page of `gpunet serve` for the real (small) model, open in the browser."""
    from gpunet import serve

    server = serve.make_server(mnist_model.net, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
    yield browser
    server.shutdown()
    server.server_close()


def draw(driver, strokes, kind="mouse"):
    """Draw polylines given in canvas pixels (0..280, origin top left), one pointer-down per
    stroke."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    pad = driver.find_element("id", "pad")
    kinds = {
        "mouse": interaction.POINTER_MOUSE,
        "touch": interaction.POINTER_TOUCH,
        "pen": interaction.POINTER_PEN,
    }
    actions = ActionBuilder(driver, mouse=PointerInput(kinds[kind], kind), duration=15)
    for stroke in strokes:
        x, y = stroke[0]
        actions.pointer_action.move_to(
            pad, x - 140, y - 140
        ).pointer_down()  # offsets from the centre
        for x, y in stroke[1:]:
            actions.pointer_action.move_to(pad, x - 140, y - 140)
        actions.pointer_action.pointer_up()
    actions.perform()


def answer(driver):
    """Wait until the page shows the answer to its latest drawing; return (digit, probabilities,
    seen)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d):
        return d.execute_script(
            "const p = document.getElementById('pad').dataset.version, a = "
            "document.getElementById('digit');"
            "return p === a.dataset.version && a.textContent !== '?' ? a.textContent : null;"
        )

    digit = WebDriverWait(driver, 20).until(settled)
    probs = driver.execute_script(
        "return [...Array(10).keys()].map(d => Number(document.getElementById('bar-' + "
        "d).dataset.p));"
    )
    seen = driver.execute_script(
        "const c = document.getElementById('seen');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);"
    )
    seen = np.array(seen, np.float32).reshape(28, 28, 4)[..., 0] / 255
    return int(digit), probs, seen


def clear(driver):
    driver.find_element("id", "clear").click()
    assert driver.find_element("id", "digit").text == "?"


def ellipse(cx, cy, rx, ry, n=28):
    return [
        (cx + rx * math.sin(2 * math.pi * k / n), cy - ry * math.cos(2 * math.pi * k / n))
        for k in range(n + 1)
    ]


DIGITS = {  # digit -> strokes, as a person draws them
    7: [[(80, 60), (205, 60)], [(205, 60), (175, 120), (145, 180), (120, 240)]],
    1: [[(140, 40), (140, 140), (140, 240)]],
    0: [ellipse(140, 140, 60, 95)],
    4: [[(170, 40), (120, 110), (75, 170), (215, 170)], [(175, 90), (175, 170), (175, 250)]],
}


def test_draw_digits_and_read_the_page(page, tmp_path):
    Image = optional("PIL.Image", "cli")

    from gpunet.data.pictures import mnist_style

    read = {}
    for digit, strokes in DIGITS.items():
        clear(page)
        for k in range(len(strokes)):  # stroke by stroke: the page answers after each one
            draw(page, strokes[k : k + 1])
            shown, probs, seen = answer(page)
        read[digit] = shown
        assert abs(sum(probs) - 1) < 1e-3 and int(np.argmax(probs)) == shown, probs
        # the small picture is what the model saw: the canvas, made MNIST-style
        png = page.execute_script("return document.getElementById('pad').toDataURL('image/png');")
        canvas = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1])))
        np.testing.assert_allclose(seen, mnist_style(canvas)[0], atol=2 / 255)
        if digit == 7:
            shot = tmp_path / "serve-page.png"
            page.save_screenshot(str(shot))
            assert shot.read_bytes()[:4] == b"\x89PNG"
            if os.environ.get("GPUNET_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["GPUNET_SCREENSHOT"])
    assert read == {d: d for d in DIGITS}, read


@pytest.mark.parametrize("kind", ["touch", "pen"])
def test_finger_and_pen(page, kind):
    clear(page)
    draw(page, DIGITS[1], kind)
    assert answer(page)[0] == 1


def test_clear_and_a_blank_canvas(page):
    clear(page)
    draw(page, DIGITS[7])
    answer(page)
    clear(page)
    probs = page.execute_script(
        "return [...Array(10).keys()].map(d => Number(document.getElementById('bar-' + "
        "d).dataset.p));"
    )
    seen = page.execute_script(
        "return Array.from(document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, "
        "28).data);"
    )
    assert probs == [0] * 10 and max(seen[0::4]) == 0
    assert page.find_element("id", "status").text == ""
