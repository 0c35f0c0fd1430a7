"""Screenshot a leaderboard page in headless Chromium (the browser tests/test_page.py drives) at a given width.

    python benchmarks/page_screenshot.py leaderboard/index.html benchmarks/results/page_after.png --width 1600

Prints, for each row, where its worst-case cell and verdict cell end (px from the left) and whether they lie
within the viewport, so the picture comes with the numbers the browser test checks.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars"]
PROBE = """
const cells = (name) => Array.from(document.querySelectorAll('#leaderboard tr.row td.col-' + name));
const right = (name) => cells(name).map(td => Math.round(td.getBoundingClientRect().right));
return {viewport: window.innerWidth, worst_case_acc: right('worst_case_acc'), verdict: right('verdict'),
        columns: Array.from(document.querySelectorAll('#leaderboard thead th'))
                      .filter(th => th.getBoundingClientRect().width > 0).length};
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    profile = tempfile.mkdtemp(prefix="robustify-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--window-size={args.width},{args.height}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(args.page.resolve().as_uri())
        probe = driver.execute_script(PROBE)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.png))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    view = probe["viewport"]
    print(f"{args.png}: viewport {view} px, {probe['columns']} visible column(s)")
    for name in ("worst_case_acc", "verdict"):
        ends = probe[name]
        print(f"  {name}: right edges {ends} px -> {'all within' if ends and max(ends) <= view else 'NOT all within'}"
              " the viewport")


if __name__ == "__main__":
    main()
