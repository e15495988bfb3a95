#!/usr/bin/env python3
"""Drives the web console in headless Chromium, as a person would.

Opens the console of a running tlserve, checks that it lists the backbone,
trains a head from a labelled text file (or an image folder) with the curves
drawn live, waits for the confusion matrix of the held-out examples and
predicts a typed text (or a chosen image).
With --token it first checks that calls without one are refused and shown as
UNAUTHENTICATED, then pastes the token.

Every step saves a PNG screenshot into --artifacts. On success prints one JSON
object (what was seen) on stdout; on failure exits non-zero with the reason
and, where the page got that far, a screenshot named failure.png.

Needs Debian's chromium and chromium-driver and the selenium package of the
test virtualenv: scripts/setup-browser.sh installs them. Selenium Manager is
never used (the driver path is given), so nothing is downloaded.

Usage: console_browser.py --url http://127.0.0.1:PORT/console/
       (--examples FILE | --images DIR) --artifacts DIR [--token TOKEN]
       [--head NAME] [--backbone NAME] [--epochs N] [--learning-rate LR]
       [--batch-size N] [--predict-text TEXT | --predict-image FILE]
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SETUP = "scripts/setup-browser.sh"
WINDOW = (1280, 1000)


def die(message: str) -> "None":
    print(f"console_browser: {message}", file=sys.stderr)
    sys.exit(1)


def labels_of(args):
    """The labels of the examples, sorted: an image folder's subfolders, or the
    distinct labels of a CSV (label column) or JSON Lines file."""
    if args.images:
        return sorted(p.name for p in Path(args.images).iterdir() if p.is_dir())
    path = Path(args.examples)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    return sorted({str(row["label"]).strip() for row in rows})


def require_tools():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        print(
            f"console_browser: missing {', '.join(missing)}: run {SETUP} "
            "(installs Debian's chromium and chromium-driver)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        import selenium  # noqa: F401
    except ImportError:
        print(
            f"console_browser: the selenium package is missing from {sys.executable}: run {SETUP}",
            file=sys.stderr,
        )
        sys.exit(2)


class Console:
    """The page and the checks of one run."""

    def __init__(self, args):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        # Selenium Manager would look for (and could try to download) a
        # driver; with the driver's path given it is skipped, and offline
        # mode keeps it from reaching out should a later version call it.
        os.environ["SE_OFFLINE"] = "true"
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless=new",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--no-sandbox",  # root in a container has no user namespaces
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--lang=en-US",
            "--force-device-scale-factor=1",
            "--hide-scrollbars",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=str(CHROMEDRIVER), log_output=os.devnull)
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.set_window_size(*WINDOW)
        self.artifacts = Path(args.artifacts)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        for old in self.artifacts.glob("*.png"):
            old.unlink()
        self.screenshots = []
        self.browser_log = []
        self.args = args

    # ---------------------------------------------------------------- tools

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def by_id(self, element_id):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def wait_for(self, what, condition, timeout=30.0, fail_fast=None):
        """Polls condition() until it is truthy; fail_fast() may return a reason to stop."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if fail_fast:
                reason = fail_fast()
                if reason:
                    self.fail(f"while waiting for {what}: {reason}")
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def text(self, element_id):
        return self.js("const n = document.getElementById(arguments[0]); return n ? n.textContent.trim() : null;", element_id)

    def visible_error(self, element_id):
        return self.js(
            "const n = document.getElementById(arguments[0]);"
            "return n && !n.hidden ? n.textContent.trim() : '';",
            element_id,
        )

    def shot(self, name, element_id=None):
        if element_id:
            self.js(
                "document.getElementById(arguments[0]).scrollIntoView({block: 'start'}); window.scrollBy(0, -8);",
                element_id,
            )
            time.sleep(0.15)
        path = self.artifacts / f"{len(self.screenshots) + 1:02d}-{name}.png"
        if not self.driver.save_screenshot(str(path)):
            self.fail(f"could not save the screenshot {path}")
        self.screenshots.append(str(path))

    def collect_log(self):
        self.browser_log.extend(self.driver.get_log("browser"))

    def fail(self, message):
        try:
            self.driver.save_screenshot(str(self.artifacts / "failure.png"))
            self.collect_log()
        except Exception:  # the browser may be gone
            pass
        log = "\n".join(f"  {e.get('level')}: {e.get('message')}" for e in self.browser_log)
        die(f"{message}\nbrowser console:\n{log or '  (empty)'}")

    def set_value(self, element_id, value):
        element = self.by_id(element_id)
        element.clear()
        element.send_keys(str(value))

    def select(self, element_id, value):
        from selenium.webdriver.support.ui import Select

        Select(self.by_id(element_id)).select_by_value(value)

    # ---------------------------------------------------------------- steps

    def open(self):
        self.driver.get(self.args.url)
        ready = self.wait_for(
            "the API definitions to load",
            lambda: self.js("return document.body.dataset.ready || ''"),
        )
        if ready != "true":
            self.fail(f"the page could not load the API definitions: {self.text('app-status')}")

    def backbone_row(self):
        return self.js(
            "const row = document.querySelector(`#backbones-body tr[data-backbone=\"${arguments[0]}\"]`);"
            "return row ? row.dataset.state : '';",
            self.args.backbone,
        )

    def needs_token(self):
        """Without a token, the listing is refused and the code is shown."""
        code = self.wait_for(
            "the UNAUTHENTICATED error of the backbone listing",
            lambda: self.js(
                "const n = document.getElementById('backbones-error');"
                "return n && !n.hidden ? n.dataset.code : '';"
            ),
        )
        if code != "UNAUTHENTICATED":
            self.fail(f"without a token the listing failed with {code!r}, not UNAUTHENTICATED")
        message = self.visible_error("backbones-error")
        if "UNAUTHENTICATED" not in message:
            self.fail(f"the error does not name its status code: {message!r}")
        self.shot("needs-token")
        self.set_value("token", self.args.token)
        self.by_id("token-save").click()
        if self.js("return document.getElementById('token').value") != "":
            self.fail("the token stays visible in the token field after it was set")
        return message

    def lists_backbone(self):
        state = self.wait_for(
            f"{self.args.backbone} to be listed as ready",
            lambda: self.backbone_row() == "ready" and "ready",
            timeout=60,
            fail_fast=lambda: self.visible_error("backbones-error"),
        )
        self.wait_for(
            "the heads listing",
            lambda: self.js("return document.getElementById('heads').dataset.loaded || ''") == "true",
            fail_fast=lambda: self.visible_error("heads-error"),
        )
        self.shot("backbones-listed")
        return state

    def choose_examples(self):
        self.select("train-backbone", self.args.backbone)
        self.set_value("train-head-name", self.args.head)
        if self.args.images:
            # A folder given to a webkitdirectory input uploads every file below it.
            self.by_id("train-folder").send_keys(str(Path(self.args.images).resolve()))
        else:
            self.by_id("train-file").send_keys(str(Path(self.args.examples).resolve()))
        count = self.wait_for(
            "the examples to be read",
            lambda: self.js("return document.getElementById('train-data-summary').dataset.examples || ''"),
            fail_fast=lambda: self.visible_error("train-data-error"),
        )
        self.select("train-kind", "linear")
        self.select("train-solver", "adamw")
        self.set_value("train-epochs", self.args.epochs)
        self.set_value("train-learning-rate", self.args.learning_rate)
        self.set_value("train-batch-size", self.args.batch_size)
        self.set_value("train-holdout", "0.2")
        self.set_value("train-seed", "7")
        # The summary is recomputed when the share changes.
        self.by_id("train-seed").click()
        self.shot("examples-chosen", "train")
        return int(count), self.text("train-data-summary")

    def train(self):
        started = time.monotonic()
        self.by_id("train-start").click()

        def job_failed():
            state = self.js("return document.getElementById('train-status').dataset.state")
            if state in ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "error"):
                return f"{self.text('train-status')}: {self.visible_error('train-error')}"
            return ""

        self.wait_for(
            "the first epoch on the curve",
            lambda: int(self.js("return document.getElementById('train-chart-loss').dataset.epochs") or 0) >= 1,
            timeout=240,
            fail_fast=job_failed,
        )
        self.wait_for(
            "the job to succeed",
            lambda: self.js("return document.getElementById('train-status').dataset.state") == "JOB_STATE_SUCCEEDED",
            timeout=240,
            fail_fast=job_failed,
        )
        seconds = time.monotonic() - started
        epochs = self.args.epochs
        curves = self.js(
            "const out = {};"
            "for (const id of ['curve-train-loss', 'curve-validation-loss', 'curve-train-accuracy', 'curve-validation-accuracy']) {"
            "  const line = document.getElementById(id);"
            "  const points = line ? line.getAttribute('points').trim() : '';"
            "  out[id] = {points: points ? points.split(/\\s+/).length : 0,"
            "             dots: line ? line.parentNode.querySelectorAll('circle.point.' + line.classList[1]).length : 0};"
            "}"
            "out.rows = document.querySelectorAll('#train-epochs-body tr').length;"
            "return out;"
        )
        for curve in ("curve-train-loss", "curve-train-accuracy"):
            if curves[curve]["points"] != epochs or curves[curve]["dots"] != epochs:
                self.fail(f"{curve} has {curves[curve]} points; expected one for each of the {epochs} epochs")
        if curves["rows"] != epochs:
            self.fail(f"the figures table has {curves['rows']} epochs; expected {epochs}")
        for curve in ("curve-validation-loss", "curve-validation-accuracy"):
            if curves[curve]["points"] not in (0, epochs):
                self.fail(f"{curve} has {curves[curve]['points']} points; expected 0 or {epochs}")
        self.shot("trained", "train-run")
        return seconds, curves, self.text("train-result")

    def confusion(self, labels):
        self.wait_for(
            "the confusion matrix",
            lambda: self.js("return document.getElementById('confusion').dataset.state") in ("done", "error", "none"),
            timeout=60,
        )
        if self.js("return document.getElementById('confusion').dataset.state") != "done":
            self.fail(f"no confusion matrix: {self.text('confusion-status')} {self.visible_error('confusion-error')}")
        matrix = self.js(
            "const table = document.getElementById('confusion-matrix');"
            "const columns = [...table.querySelectorAll('thead th')].slice(1).map((th) => th.textContent);"
            "const rows = [...table.querySelectorAll('tbody tr')].map((tr) => ({"
            "  label: tr.querySelector('th').textContent,"
            "  counts: [...tr.querySelectorAll('td')].map((td) => Number(td.dataset.count))}));"
            "return {columns, rows, hidden: table.hidden, accuracy: Number(document.getElementById('confusion').dataset.accuracy)};"
        )
        if matrix["hidden"] or sorted(matrix["columns"]) != sorted(labels):
            self.fail(f"the confusion matrix columns are {matrix['columns']}, expected the labels {labels}")
        if [r["label"] for r in matrix["rows"]] != matrix["columns"]:
            self.fail(f"the confusion matrix rows {matrix['rows']} do not match its columns")
        self.shot("confusion-matrix", "confusion")
        return matrix

    def predict(self, labels):
        head = self.js("return document.getElementById('predict-head').value")
        if head != self.args.head:
            self.fail(f"the prediction form offers {head!r}, not the new head {self.args.head!r}")
        if self.args.predict_image:
            # Choosing an image predicts it at once, as dropping one does.
            self.by_id("predict-image").send_keys(str(Path(self.args.predict_image).resolve()))
        else:
            self.set_value("predict-text", self.args.predict_text)
            self.by_id("predict-run").click()
        scores = self.wait_for(
            "a prediction",
            lambda: self.js(
                "return [...document.querySelectorAll('#predict-result li')]"
                ".map((li) => ({label: li.dataset.label, probability: Number(li.dataset.probability)}));"
            ),
            fail_fast=lambda: self.visible_error("predict-error"),
        )
        if not {s["label"] for s in scores} <= set(labels):
            self.fail(f"predicted labels {scores} are not the head's labels {labels}")
        total = sum(s["probability"] for s in scores)
        if len(scores) == len(labels) and abs(total - 1.0) > 1e-3:
            self.fail(f"the probabilities of every label sum to {total}, not 1")
        self.shot("prediction", "predict")
        return scores, self.text("predict-status")

    def heads_listed(self):
        return self.js(
            "return [...document.querySelectorAll('#heads-body tr[data-head]')].map((tr) => tr.dataset.head + '@' + tr.dataset.version);"
        )

    def check_token_kept_in_tab_only(self):
        if not self.args.token:
            return
        stored = self.js(
            "return {session: sessionStorage.getItem('tlserve-console-token'),"
            " local: Object.keys(localStorage).length, html: document.documentElement.outerHTML.includes(arguments[0])};",
            self.args.token,
        )
        if stored["session"] != self.args.token:
            self.fail("the token is not kept in session storage")
        if stored["local"] or stored["html"]:
            self.fail(f"the token leaked out of session storage: {stored}")

    def check_browser_log(self):
        self.collect_log()
        severe = [e for e in self.browser_log if e.get("level") == "SEVERE"]
        if severe:
            self.fail("the page logged errors: " + "; ".join(e.get("message", "") for e in severe))
        if self.args.token and any(self.args.token in e.get("message", "") for e in self.browser_log):
            self.fail("the token appears in the browser console")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the console, e.g. http://127.0.0.1:8080/console/")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--examples", help="labelled text file to train from")
    data.add_argument("--images", help="image folder to train from, one subfolder per label")
    parser.add_argument("--artifacts", required=True, help="folder for the screenshots")
    parser.add_argument("--token", default="", help="bearer token the server wants, if any")
    parser.add_argument("--head", default="console-reviews")
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", default="0.05")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--predict-text", default="The soup was cold and the waiter ignored us all evening.")
    parser.add_argument("--predict-image", help="an image to predict instead of a text")
    args = parser.parse_args()
    require_tools()

    report = {}
    started = time.monotonic()
    console = Console(args)
    try:
        console.open()
        if args.token:
            report["without_token"] = console.needs_token()
        report["backbone_state"] = console.lists_backbone()
        report["examples"], report["data_summary"] = console.choose_examples()
        seconds, report["curves"], report["train_result"] = console.train()
        report["train_seconds"] = round(seconds, 1)
        labels = labels_of(args)
        report["confusion"] = console.confusion(labels)
        report["prediction"], report["predict_status"] = console.predict(labels)
        report["heads"] = console.heads_listed()
        if not any(h.startswith(f"{args.head}@") for h in report["heads"]):
            console.fail(f"the heads table does not list {args.head}: {report['heads']}")
        console.check_token_kept_in_tab_only()
        console.check_browser_log()
        report["screenshots"] = console.screenshots
        report["seconds"] = round(time.monotonic() - started, 1)
        report["chromium"] = console.driver.capabilities.get("browserVersion")
    finally:
        console.driver.quit()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
