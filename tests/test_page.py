"""The leaderboard page (index.html) and LaTeX table; the page is checked in headless chromium."""

from __future__ import annotations

import inspect
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import escape

from robustify.evaluation import audit as audit_suite
from robustify.evaluation import results as evaluate_results
from robustify.reporting import leaderboard
from robustify.reporting.leaderboard import build_table, collect, write_leaderboard
from robustify.reporting.page import FLAG_EXPLANATIONS, render_page, to_latex

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "leaderboard" / "results"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The leaderboard rebuilt from the committed results (6 real rows, with plots)."""
    out = tmp_path_factory.mktemp("lb")
    write_leaderboard(RESULTS, out)
    return out


def test_leaderboard_writes_self_contained_page(built):
    html = (built / "index.html").read_text()
    csv = pd.read_csv(built / "leaderboard.csv")
    assert html.count('<tr class="row') == len(csv) == 6
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", html), \
        "the page must not fetch anything"
    assert html.count('src="data:image/png;base64,') == len(list((built / "plots").glob("*.png"))) == 2
    for column in csv.columns:
        if column not in ("attacks", "budgets", "not_applicable", "settings_id", "result") and "version" not in column:
            assert f">{column}</th>" in html
    assert "bpda-beats-standard" in html and str(escape(FLAG_EXPLANATIONS["bpda-beats-standard"])) in html
    assert "not applicable: the source would be the model itself" in html  # n/a cells say why


def test_page_renders_new_columns_and_groups_base_first():
    df = build_table(collect(RESULTS))
    df["worst_case_ci95"] = "[15.0, 26.0]"
    html = render_page(df)
    assert ">worst_case_ci95</th>" in html and "[15.0, 26.0]" in html
    rows = re.findall(r'<tr class="row ([^"]*)"', html)
    assert "base" in rows[0].split() and "group-start" in rows[0].split()  # the base row opens its group


def test_every_flag_has_an_explanation():
    emitted = set(re.findall(r'flags\.append\("([a-z-]+)"\)', inspect.getsource(evaluate_results.audit)))
    emitted |= set(re.findall(r'"([a-z]+(?:-[a-z]+){2,})"', inspect.getsource(leaderboard._flag_eps_monotonicity)))
    emitted |= set(audit_suite.FLAGS.values())  # the sanity suite's flags (robustify audit / evaluate --audit)
    assert emitted and emitted <= set(FLAG_EXPLANATIONS), sorted(emitted - set(FLAG_EXPLANATIONS))


def test_latex_is_a_booktabs_table_of_ranked_rows(built):
    tex = (built / "leaderboard.tex").read_text()
    csv = pd.read_csv(built / "leaderboard.csv")
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")].splitlines()[1:]
    assert [int(line.split("&")[0]) for line in body] == csv["rank"].tolist()
    assert r"worst\_case\_acc" in tex and "21.50" in tex
    assert to_latex(csv) == tex  # rebuilt from the CSV alone


# ------------------------------------------------------------------------------------------
# in a real browser
# ------------------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="robustify-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _column(driver, name: str) -> list[str]:
    from selenium.webdriver.common.by import By

    headers = [th.text.strip() for th in driver.find_elements(By.CSS_SELECTOR, "#leaderboard thead th")]
    i = headers.index(name) + 1
    cells = driver.find_elements(By.CSS_SELECTOR, f"#leaderboard tbody tr.row td:nth-child({i})")
    return [td.text.strip() for td in cells]


def _click(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    [th] = [th for th in driver.find_elements(By.CSS_SELECTOR, "#leaderboard thead th") if th.text.strip() == name]
    th.click()


def test_page_in_chromium(browser, built):
    from selenium.webdriver.common.by import By

    browser.get((built / "index.html").as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    csv = pd.read_csv(built / "leaderboard.csv")
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr.row")
    assert len(rows) == len(csv)
    assert "base" in rows[0].get_attribute("class").split()  # grouped: the base model opens its group
    _click(browser, "clean_acc")
    shown = [float(v) for v in _column(browser, "clean_acc")]
    assert shown == sorted(csv["clean_acc"], reverse=True)
    _click(browser, "clean_acc")
    assert [float(v) for v in _column(browser, "clean_acc")] == sorted(csv["clean_acc"])
    assert browser.execute_script(  # each row's settings row moved with it
        "return Array.from(document.querySelectorAll('#leaderboard tr.row'))"
        ".every(r => r.nextElementSibling && r.nextElementSibling.classList.contains('detail'))")
    _click(browser, "defense")
    assert _column(browser, "defense")[0].startswith("meansparse")
    row = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr.row")[0]
    settings = row.find_element(By.XPATH, "following-sibling::tr[1]")
    assert not settings.is_displayed()
    row.find_element(By.CSS_SELECTOR, "button.toggle").click()  # the row's settings and flags, explained
    assert settings.is_displayed() and "budgets" in settings.text and "apgd-ce(iters=20" in settings.text
    browser.find_element(By.ID, "regroup").click()
    assert _column(browser, "rank")[0] == str(csv.loc[csv["defense"] == "none", "rank"].iloc[0])
    browser.execute_script("console.error('probe')")  # the log channel works: a console error would show
    assert any("probe" in e["message"] for e in browser.get_log("browser"))


def test_numeric_sort_in_chromium(browser, tmp_path):
    """Numbers sort as numbers (9.5 < 10 < 100), empty cells last either way."""
    df = build_table(collect(RESULTS)).head(4).copy()
    df["seconds"] = [100.0, 9.5, None, 10.0]
    page = tmp_path / "index.html"
    page.write_text(render_page(df))
    browser.get(page.as_uri())
    _click(browser, "seconds")
    assert _column(browser, "seconds") == ["100", "10", "9.5", ""]
    _click(browser, "seconds")
    assert _column(browser, "seconds") == ["9.5", "10", "100", ""]
