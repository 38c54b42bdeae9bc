"""The README's MLflow UI screenshots, taken with headless Chromium from a running `mlflow server` / `mlflow ui`.

    python docs/screenshots.py http://127.0.0.1:5000 --experiment image-pipeline

Takes the experiment's three most recent runs: the newest one's page (description, metrics), the run list's
chart view (per-epoch loss and accuracy, the runs overlaid), and the compare view of the three (parallel
coordinates of optimizer and rate against validation and test accuracy). Writes docs/ui-*.png, as 256-colour PNGs (the UI
has few colours; this keeps each file well under 200 KB). Driven as tests/test_ui.py drives it (tests/browser.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import INSTALL_HINT, Chromium, chromium_path  # noqa: E402

PARAMS = ("optimizer.name", "optimizer.learning_rate")  # the compare view's parallel coordinates axes
METRICS = ("val_accuracy", "test_accuracy")
SETTLE = 3  # seconds for the charts' animations to end once their data is in


def close_assistant(browser: Chromium) -> None:
    """The MLflow Assistant panel opens on a fresh profile and takes a third of the width."""
    browser.evaluate("document.querySelectorAll('button[aria-label=\"Close\"]').forEach(b => b.click())")


def press(browser: Chromium, key: str, code: int) -> None:
    for kind in ("rawKeyDown", "keyUp"):
        browser.command("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code})


def shoot(browser: Chromium, path: Path) -> None:
    time.sleep(SETTLE)
    # Plotly's zoom/pan toolbar shows on every chart in headless Chromium (a mouse would bring up only one's)
    browser.evaluate("document.head.insertAdjacentHTML('beforeend', '<style>.modebar { display: none }</style>')")
    browser.screenshot(path)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", default="image-pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    executable = chromium_path()
    if executable is None:
        sys.exit(f"error: Chromium is not installed: {INSTALL_HINT}")

    from mlflow.tracking import MlflowClient

    store = MlflowClient(args.url)
    experiment = store.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"error: {args.url} has no experiment {args.experiment!r}")
    runs = store.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=3)
    if len(runs) < 2:
        sys.exit(f"error: experiment {args.experiment!r} has {len(runs)} runs; the compare view needs 2 or more")
    newest, base = runs[0], f"{args.url}/#/experiments/{experiment.experiment_id}"

    with Chromium(executable, width=1280, height=1000) as browser:
        browser.open(f"{base}/runs/{newest.info.run_id}")
        browser.wait_for_text("Description", newest.info.run_name, "val_accuracy")
        close_assistant(browser)
        shoot(browser, args.out / "ui-run.png")

        # the run list's chart view: each metric one chart, the runs overlaid
        browser.open(f"{base}/runs?compareRunsMode=CHART")
        search = json.dumps('input[placeholder="Search metric charts"]')
        browser.wait_for(f"document.querySelector({search})", "the metric charts' search box")
        close_assistant(browser)
        browser.evaluate(f"document.querySelector({search}).focus()")
        browser.command("Input.insertText", {"text": "^(val_)?(loss|accuracy)$"})
        cards = '[data-testid="experiment-view-compare-runs-card"]'
        browser.wait_for(f"document.querySelectorAll('{cards} svg.main-svg').length >= 4", "4 drawn metric charts")
        shoot(browser, args.out / "ui-charts.png")

        # the compare view; its parallel coordinates with the axes the README names
        ids = json.dumps([run.info.run_id for run in runs])
        browser.open(f"{args.url}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}")
        browser.wait_for_text(f"Comparing {len(runs)} Runs", "Parallel Coordinates Plot", "Clear All")
        browser.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText === 'Clear All').click()")
        for select, choices in (("dubois-select-1", PARAMS), ("dubois-select-2", METRICS)):  # Parameters, Metrics
            browser.evaluate(f"document.getElementById('{select}').focus()")
            for choice in choices:
                browser.command("Input.insertText", {"text": choice})
                time.sleep(0.5)  # the option list filters as one types
                press(browser, "Enter", 13)
            press(browser, "Escape", 27)
        browser.wait_for("document.querySelector('svg.main-svg')", "the parallel coordinates plot")
        close_assistant(browser)
        shoot(browser, args.out / "ui-compare.png")

if __name__ == "__main__":
    main()
