"""Headless Chromium for browser tests, driven by selenium through the system chromedriver.

`make browser` (a step of `make test`) installs Debian's ``chromium`` and ``chromium-driver``.
Without them these tests skip, or fail when GPUMARKET_REQUIRE_BROWSER=1 (as in CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path(os.environ.get("GPUMARKET_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("GPUMARKET_CHROMEDRIVER", "/usr/bin/chromedriver"))
REQUIRE_BROWSER = os.environ.get("GPUMARKET_REQUIRE_BROWSER") == "1"
WINDOW = (1440, 1100)
PAGE_LOAD_TIMEOUT_S = 30
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "test-output"


def _unavailable(reason: str, *, module_level: bool = False) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"GPUMARKET_REQUIRE_BROWSER=1 but {reason}; run `make install browser`")
    pytest.skip(
        f"{reason}; `make browser` installs Chromium (apt-get install chromium "
        "chromium-driver), `make install` selenium; set GPUMARKET_REQUIRE_BROWSER=1 to make "
        "this a failure",
        allow_module_level=module_level,
    )


def require_selenium() -> None:
    """For a browser test module to call before importing selenium."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("the selenium package is not installed", module_level=True)


def require_browser() -> None:
    """Skip (or, with GPUMARKET_REQUIRE_BROWSER=1, fail) without Chromium or its driver."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        _unavailable(f"headless Chromium is missing ({', '.join(missing)})")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium per test module, on a throwaway profile, with no network of its
    own: the system chromedriver is given, so Selenium Manager never downloads one."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for console_errors()
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    )
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the whole window to test-output/<name> (git-ignored); returns the path."""
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    path = SCREENSHOT_DIR / name
    # The whole page, unscrolled: the window grows by what the viewport lacks.
    page, inner, outer = driver.execute_script(
        "return [document.documentElement.scrollHeight, innerHeight, outerHeight]"
    )
    driver.set_window_size(WINDOW[0], max(WINDOW[1], int(page) + int(outer) - int(inner)))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(*WINDOW)
    return path


PHONE_WIDTH = 390  # CSS pixels, a common phone's viewport
PHONE_HEIGHT = 844


@contextmanager
def phone(driver: WebDriver) -> Iterator[None]:
    """The page as a phone shows it: a ``PHONE_WIDTH``-pixel mobile viewport (touch layout,
    device metrics emulated), back to the desktop window afterwards."""
    metrics = {"width": PHONE_WIDTH, "height": PHONE_HEIGHT, "deviceScaleFactor": 1}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": True})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def phone_screenshot(driver: WebDriver, name: str) -> Path:
    """Inside ``phone``: the whole page at phone width to test-output/<name>."""
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    path = SCREENSHOT_DIR / name
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": PHONE_WIDTH, "height": max(PHONE_HEIGHT, height), "deviceScaleFactor": 1}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": True})
    driver.save_screenshot(str(path))
    return path


def console_errors(driver: WebDriver) -> list[str]:
    """The page's console errors since the last call (JS exceptions, CSP refusals, failed
    loads); reading them clears the buffer."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
