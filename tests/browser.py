"""Headless Chromium for the browser tests (Selenium with Debian's ``chromium`` and ``chromium-driver``).

``with chromium() as driver:`` gives a headless Chrome driver (window 1400x1000) that keeps the page's console
log, read with ``console_errors(driver)``; ``screenshot(driver, name)`` saves a PNG under
``$TRANSFERBENCH_SCREENSHOTS`` (default ``artifacts/screenshots/`` in the repository, which CI uploads).
Selenium Manager is never used (it would download a browser or driver): the browser and the driver are the
installed ones. Without them the test skips and says what to install, except under CI (``$CI`` set), where
a missing browser fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS_ENV = "TRANSFERBENCH_SCREENSHOTS"
WINDOW = (1400, 1000)
TIMEOUT = 60  # seconds, for explicit waits: the test machines may have two cores
# Debian's packages first, then what else a machine may have (GitHub's ubuntu-latest ships Google Chrome and a
# matching chromedriver on PATH)
BROWSERS = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("/usr/bin/chromedriver", "chromedriver")


def _find(candidates: Iterable[str]) -> str | None:
    for candidate in candidates:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return found
    return None


def browser_paths() -> tuple[str, str]:
    """(browser, driver) executables; skips the test without them, or fails it under CI."""
    browser, driver = _find(BROWSERS), _find(DRIVERS)
    if browser and driver:
        return browser, driver
    missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
    message = (f"{missing} not found: install Debian's chromium and chromium-driver "
               "(`apt-get install chromium chromium-driver`) for the browser tests")
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must have them (.ci/run installs them)")
    pytest.skip(message)


@contextlib.contextmanager
def chromium(*, window: tuple[int, int] = WINDOW) -> Iterator:
    """A headless Chrome WebDriver, quit on exit; its console log is kept for ``console_errors``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", f"--window-size={window[0]},{window[1]}", "--no-sandbox",
                     "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                     "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager (which would download a driver) is skipped
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_window_size(*window)
        driver.set_page_load_timeout(TIMEOUT)
        yield driver
    finally:
        driver.quit()


def console_errors(driver, ignore: Iterable[str] = ()) -> list[str]:
    """The SEVERE console entries logged since the last call (reading the log empties it), less those whose
    message matches one of the ``ignore`` regular expressions."""
    patterns = [re.compile(p) for p in ignore]
    errors = [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    return [message for message in errors if not any(p.search(message) for p in patterns)]


def screenshots_dir() -> Path:
    return Path(os.environ.get(SCREENSHOTS_ENV) or REPO / "artifacts" / "screenshots")


def screenshot(driver, name: str) -> Path:
    """Save the window as ``<screenshots dir>/<name>.png`` (a name of letters, digits, ``.``, ``_``, ``-``)."""
    folder = screenshots_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".png")
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"the screenshot {path} could not be saved")
    return path
