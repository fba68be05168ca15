"""A run's pages in the MLflow UI, opened in headless Chromium: each is checked for what it
must show, and screenshotted. The browser test (tests/test_ui.py) and the README's pictures
both come from here.

    MLFLOW_TRACKING_URI=sqlite:////abs/mlflow.db python tests/ui_pages.py RUN_ID OUT_DIR

starts `mlflow ui` on that store (a free loopback port), visits the pages and saves one PNG
per page in OUT_DIR. It drives Debian's `chromium` and `chromium-driver` (or those named by
$CHROMIUM and $CHROMEDRIVER); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import NO_JOBS, local_env, running
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from cifar_experiments.tracking.links import TRAINING_VIEW

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# In the side bar of the GenAI view only; the model-training view lists Runs, Models, Traces.
GENAI_ONLY = "Observability"
CHART_SEARCH = 'input[placeholder="Search metric charts"]'
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    return f"not installed: {', '.join(missing)}" if missing else None


@contextlib.contextmanager
def mlflow_ui(store_uri: str, log_path: Path) -> Iterator[str]:
    """`mlflow ui` on `store_uri`, on a free loopback port: its address while the block runs."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
                "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip

    env = local_env(**NO_JOBS)
    with running(command, env, "/health", log_path, seconds=180) as url:
        yield url


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, driven through the system's chromedriver."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or driver
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        arguments = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", f"--window-size={width},{height}",
                     f"--user-data-dir={profile}"]  # fmt: skip
        for argument in arguments:
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


@dataclass(frozen=True)
class Page:
    """A page of the UI, and what shows that it rendered."""

    name: str
    path: str  # after the UI's address: "#/experiments/..."
    texts: tuple[str, ...]  # all on the page once it has rendered
    rendered: Callable[[WebDriver], bool] = lambda driver: True
    search: str | None = None  # typed into the page's chart search: charts draw only in view


def run_pages(experiment_id: str, run_id: str, run_name: str) -> list[Page]:
    """The pages people look at for a finished run, in the model-training view."""
    run = f"#/experiments/{experiment_id}/runs/{run_id}"

    def charts(name: str, search: str, metric: str) -> Page:
        """The run's metric charts that `search` finds, one of them `metric`'s, drawn."""
        path, texts = f"{run}/model-metrics{TRAINING_VIEW}", (f"{run_name} ({metric})",)
        return Page(name, path, texts, lambda driver: _charts_with_lines(driver) >= 1, search)

    return [
        Page("experiment", f"#/experiments/{experiment_id}{TRAINING_VIEW}", (run_name, "Runs")),
        Page("run", f"{run}{TRAINING_VIEW}", (run_name, "Overview", "Model metrics", "lr")),
        Page(
            "model-metrics",
            f"{run}/model-metrics{TRAINING_VIEW}",
            ("Model metrics",),
            _curves_first,
        ),
        charts("training-charts", "train/", "train/loss"),
        charts("accuracy-charts", "val/accuracy", "val/accuracy"),
        Page(
            "confusion-matrix",
            f"{run}/artifacts/evaluation/val/confusion_matrix.png{TRAINING_VIEW}",
            ("evaluation/val/confusion_matrix.png",),
            lambda driver: _largest_image_width(driver) >= 500,
        ),
    ]


def _charts_with_lines(driver: WebDriver) -> int:
    """Plotly charts on the page that have drawn a line."""
    charts = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
    return sum(bool(c.find_elements(By.CSS_SELECTOR, "path.js-line")) for c in charts)


def _curves_first(driver: WebDriver) -> bool:
    """The Model metrics tab as it opens: the training and validation curves come first, and
    are drawn, before any chart of one point."""
    return _sections(driver)[:2] == ["train", "val"] and _charts_with_lines(driver) >= 1


def _sections(driver: WebDriver) -> list[str]:
    """The metric chart groups the page lists, in its order: "train (6)" reads "train"."""
    body = driver.find_element(By.TAG_NAME, "body").text
    return re.findall(r"^(\S+)\s+\(\d+\)\s*$", body, flags=re.MULTILINE)


def _largest_image_width(driver: WebDriver) -> int:
    """The natural width of the largest image that has loaded (0 when none has)."""
    return driver.execute_script(
        "return Math.max(0, ...Array.from(document.images, i => i.complete ? i.naturalWidth : 0))"
    )


def visit(driver: WebDriver, url: str, page: Page, screenshot: Path, timeout: float = 90) -> None:
    """Open `url` and wait until `page` shows all it should, then save a screenshot; raises
    AssertionError naming what never appeared."""
    driver.get(url)
    if page.search:
        box = WebDriverWait(driver, timeout).until(
            lambda driver: driver.find_elements(By.CSS_SELECTOR, CHART_SEARCH)
        )[0]
        # The page keeps the last search when the route stays the same: replace it.
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE, page.search)

    def shown(driver: WebDriver) -> bool:
        for close in driver.find_elements(By.CSS_SELECTOR, ASSISTANT_CLOSE):
            close.click()  # the assistant's panel opens on a first visit and hides the page
        body = driver.find_element(By.TAG_NAME, "body").text
        in_training_view = GENAI_ONLY not in body
        return in_training_view and all(t in body for t in page.texts) and page.rendered(driver)

    try:
        WebDriverWait(driver, timeout, poll_frequency=1).until(shown)
    except TimeoutException:
        driver.save_screenshot(str(screenshot))
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [text for text in page.texts if text not in body]
        wrong_view = " (it opened in the GenAI view)" if GENAI_ONLY in body else ""
        raise AssertionError(
            f"{page.name} ({url}) did not render within {timeout:.0f} s{wrong_view}: missing "
            f"{missing or 'its charts or image'}; see {screenshot}"
        ) from None
    time.sleep(1)  # let the last chart finish drawing before the picture is taken
    driver.save_screenshot(str(screenshot))


def main(run_id: str, out_dir: str) -> None:
    import mlflow

    run = mlflow.get_run(run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages = run_pages(run.info.experiment_id, run_id, run.info.run_name)
    with mlflow_ui(mlflow.get_tracking_uri(), out / "mlflow-ui.log") as url, chromium() as driver:
        for page in pages:
            visit(driver, f"{url}/{page.path}", page, out / f"{page.name}.png")
            print(f"{page.name}: {out / page.name}.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
