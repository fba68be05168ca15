"""The MLflow UI on a finished run, in a real browser (headless Chromium): the link a training
prints, and the pages people look at, each checked for what it must show."""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from helpers import TINY, unavailable
from ui_pages import browser_missing, chromium, mlflow_ui, run_pages, visit

from cifar_experiments.cli import cli
from cifar_experiments.tracking import links

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the pages' pictures go: $UI_SCREENSHOTS (CI keeps them), else a temporary folder."""
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_printed_link_opens_the_run_and_its_pages_render(
    image_folder, tracking_store, tmp_path, screenshots
):
    if browser_missing():
        unavailable(f"headless Chromium: {browser_missing()} (.ci/run installs it)")
    name = "seen-in-a-browser"
    args = ["train", *TINY, "--data", str(image_folder), "--experiment-name", "ui",
            "--run-name", name]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    link = re.search(r"then open (\S+)$", result.stdout.strip().splitlines()[-1]).group(1)
    (run,) = mlflow.search_runs(experiment_names=["ui"], output_format="list")
    pages = {p.name: p for p in run_pages(run.info.experiment_id, run.info.run_id, name)}
    assert link == f"{links.UI_ADDRESS}/{pages['run'].path}"

    with mlflow_ui(tracking_store, tmp_path / "mlflow-ui.log") as url, chromium() as driver:
        # A fresh browser, so nothing remembered picks the view: the link alone must.
        visit(driver, link.replace(links.UI_ADDRESS, url), pages["run"],
              screenshots / "printed-link.png")  # fmt: skip
        for page in pages.values():
            visit(driver, f"{url}/{page.path}", page, screenshots / f"{page.name}.png")
    assert all((screenshots / f"{name}.png").stat().st_size > 10_000 for name in pages)
