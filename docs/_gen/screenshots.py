"""Screenshots of the built site in headless Chromium, opened from disk with the network switched off.

    python docs/_gen/screenshots.py site docs/assets/screenshots

Takes the home page, a how-to and a reference page at 1600x1000 (the browser the page test uses: Debian's
chromium + chromedriver through selenium). Every host name resolves to nothing, so what renders is what the site
ships: a missing style or script would show.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PAGES = {"home.png": "index.html", "how-to.png": "how-to/study.html", "reference.png": "reference/cli.html"}
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000",
         "--host-resolver-rules=MAP * ~NOTFOUND"]


def main(site: str, out: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="robustify-docs-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        for name, page in PAGES.items():
            driver.get((Path(site).resolve() / page).as_uri())
            driver.save_screenshot(str(out_dir / name))
            print(out_dir / name, driver.title)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
