"""The dashboard page in headless Chromium (Debian's chromium and chromedriver, driven by Selenium):
from a live swarm, updating itself in place when a node stops; and with 1,000 synthetic nodes.

Screenshots go to the test's temporary folder; with POTLUCK_HEALTH_SCREENSHOT=path.png the live
swarm's wide one is also copied there (the README's picture is made this way).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from integration.test_health import generate_through, running_dashboard, wait_for
from potluck.client.health.crawler import SwarmState
from potluck.client.health.server import HealthServer
from potluck.client.health.view import synthetic_state

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromedriver: "
                                       "apt-get install chromium chromium-driver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")
WIDE, PHONE = (1400, 1000), (390, 844)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_window_size(*WIDE)
        yield driver
    finally:
        driver.quit()


def js(driver, expression: str):
    return driver.execute_script(f"return ({expression});")


def wait_until(driver, expression: str, timeout: float = 30):
    """Evaluate a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = js(driver, expression)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page never satisfied {expression!r}; it says: {js(driver, STATUS)}")


STATUS = "document.getElementById('status').textContent"
BADGES = "Array.from(document.querySelectorAll('.badge')).map(b => b.textContent)"


def cells(model: str) -> str:
    """JS: the class names of a model's coverage cells, joined with spaces."""
    selector = f"section[data-model=\"{model}\"] .cell"
    return f"Array.from(document.querySelectorAll('{selector}')).map(c => c.className).join(' ')"


def classes(*runs: tuple[str, int]) -> str:
    return " ".join(name for name, count in runs for _ in range(count))


def screenshot(driver, path: Path, size: tuple[int, int]) -> Path:
    """The whole page (up to 4,000 px high) in a window of this size."""
    driver.set_window_size(*size)
    time.sleep(0.3)
    width, height = js(driver, "[window.innerWidth, document.documentElement.scrollHeight]")
    clip = {"x": 0, "y": 0, "width": width, "height": min(height, 4000), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def test_page_from_a_live_swarm(tiny_checkpoints, swarm_factory, tmp_path, browser):
    swarm = swarm_factory()
    swarm.start_nodes(tiny_checkpoints["llama"], ["0:4", "4:8", "0:8"], "--announce-period", "3")
    [qwen] = swarm.start_nodes(tiny_checkpoints["qwen3"], ["0:5"], "--announce-period", "3")
    swarm.start_nodes(tiny_checkpoints["qwen3"], ["5:8"], "--announce-period", "3", "--dtype", "bfloat16")
    generate_through(swarm.initial_peers, tiny_checkpoints["llama"])
    with running_dashboard(swarm.initial_peers, tmp_path / "health.log") as url:
        wait_for(url, lambda s: len(s["models"]) == 2 and all(  # every node answered, re-announced, sent pings
            n["ping_s"] is not None and n["age_s"] is not None and (n["pings"] or len(m["nodes"]) == 1)
            for m in s["models"] for n in m["nodes"]),
            timeout=60)
        browser.get(url)
        wait_until(browser, "document.querySelectorAll('tr.node').length === 5")
        assert js(browser, "document.querySelectorAll('.card .value')[3].textContent") != "–"  # tokens served
        assert js(browser, cells("tiny-llama")) == classes(("cell c2", 8))
        assert js(browser, cells("tiny-qwen3")) == classes(("cell c1", 8))  # live, but in two dtypes
        assert js(browser, BADGES) == ["usable end to end", "usable only with --mix-dtypes"]
        names = js(browser, "Array.from(document.querySelectorAll('tr.node td.name')).map(t => t.textContent)")
        assert len(names) == 5 and all(name.startswith("tiny-") for name in names)
        js(browser, "document.querySelector('section[data-model=\"tiny-llama\"] tr.node').click()")
        assert wait_until(browser, "document.querySelectorAll('tr.details .pings li').length") >= 1
        wide = screenshot(browser, tmp_path / "health-wide.png", WIDE)
        screenshot(browser, tmp_path / "health-phone.png", PHONE)
        assert js(browser, "document.documentElement.scrollWidth <= window.innerWidth")  # readable on a phone:
        assert js(browser, "Array.from(document.querySelectorAll('.table-wrap')).every("  # no sideways scrolling
                           "w => w.scrollWidth <= w.clientWidth + 1)")
        if os.environ.get("POTLUCK_HEALTH_SCREENSHOT"):
            shutil.copyfile(wide, os.environ["POTLUCK_HEALTH_SCREENSHOT"])

        browser.set_window_size(*WIDE)
        js(browser, "window.sameDocument = true")
        swarm.nodes[qwen].send_signal(signal.SIGINT)
        wait_until(browser, f"{cells('tiny-qwen3')} === '{classes(('cell c0', 5), ('cell c1', 3))}'", timeout=30)
        assert js(browser, "window.sameDocument === true")  # updated in place, not reloaded
        assert js(browser, BADGES)[1].startswith("not usable: no live node for blocks 0:5")


@contextlib.contextmanager
def serving(state: SwarmState) -> Iterator[str]:
    """A HealthServer over a fixed state, on its own loop thread; yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(HealthServer.create(lambda: state, "127.0.0.1", 0), loop).result(10)
    try:
        yield server.url
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_page_renders_a_thousand_synthetic_nodes(tmp_path, browser, capsys):
    with serving(synthetic_state(nodes=1000)) as url:
        began = time.perf_counter()
        browser.get(url)
        wait_until(browser, "document.querySelectorAll('tr.node').length === 1000", timeout=60)
        loaded = time.perf_counter() - began
        assert js(browser, "document.querySelectorAll('.cell').length") == 4 * 80
        assert js(browser, "Array.from(document.querySelectorAll('details.nodes-box')).every(d => !d.open)")
        screenshot(browser, tmp_path / "health-1000-folded.png", WIDE)  # every model's coverage on one screen
        renders = int(js(browser, "document.body.dataset.renders"))
        js(browser, "document.querySelectorAll('details.nodes-box').forEach(d => d.open = true)")
        wait_until(browser, f"Number(document.body.dataset.renders) > {renders + 1}")
        assert js(browser, "Array.from(document.querySelectorAll('tr.node')).every(r => r.offsetParent !== null)")
        render_ms = float(js(browser, "document.body.dataset.renderMs"))
    with capsys.disabled():
        print(f"\n1,000 synthetic nodes: page built {loaded * 1e3:.0f} ms after navigation; "
              f"a re-render with every table unfolded {render_ms:.0f} ms")
