"""Screenshot MLflow's chart compare view of an experiment's evaluation runs, as the README shows it.

    python docs/screenshot_compare.py --server http://127.0.0.1:5000 --experiment 1 --out docs/mlflow_compare.png

Needs Playwright's Python package (`pip install playwright`, no browser download) and a Chromium
on the machine (Debian: `apt-get install chromium`); it drives /usr/bin/chromium headless.
"""

import argparse
import urllib.parse

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # no calls out of a closed network


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True)
    p.add_argument("--experiment", required=True, help="experiment id")
    p.add_argument("--filter", default="tags.`distar.kind` = 'evaluation'", help="which runs (MLflow search syntax)")
    p.add_argument("--out", required=True)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    query = urllib.parse.urlencode({"searchFilter": args.filter, "compareRunsMode": "CHART"}, quote_via=urllib.parse.quote)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1900})
        page.goto(f"{args.server.rstrip('/')}/#/experiments/{args.experiment}/runs?{query}")
        page.wait_for_timeout(9000)  # the single-page app fetches runs and draws charts after loading
        for label in ("Got it", "Close"):  # first-visit tips and the assistant panel
            for button in page.get_by_role("button", name=label).all():
                if button.is_visible():
                    button.click()
        page.wait_for_timeout(1500)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
