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
from robustify.reporting.legend import FLAG_EXPLANATIONS, LEGEND, column_entry, explain_column
from robustify.reporting.page import render_page, to_latex
from robustify.reporting.tables import LEAD, MAX_MARKDOWN_COLUMNS

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
        if column.endswith("_ci95"):  # in its accuracy's cell, not a column of its own
            assert f">{column}</th>" not in html and column[:-5] + "_acc" in csv.columns
        elif column not in ("attacks", "budgets", "not_applicable", "settings_id", "result") and "version" not in column:
            assert f">{column}</th>" in html
    assert ">20.0 [14.6, 26.3]</td>" in html  # the base row's worst case and its interval (rounded outward), in one cell
    assert "bpda-beats-standard" in html and str(escape(FLAG_EXPLANATIONS["bpda-beats-standard"])) in html
    assert "not applicable: the source would be the model itself" in html  # n/a cells say why


def test_page_renders_new_columns_and_groups_base_first():
    df = build_table(collect(RESULTS))
    df["worst_case_ci95"] = "[15.04, 26.01]"
    df["new_score"] = 1.5
    html = render_page(df)
    assert ">worst_case_ci95</th>" not in html and "[15.0, 26.1]</td>" in html  # an interval joins its accuracy (outward)
    assert re.search(r'<th scope="col" class="more"[^>]*>new_score</th>', html)  # a new column: behind the toggle
    rows = re.findall(r'<tr class="row ([^"]*)"', html)
    assert "base" in rows[0].split() and "group-start" in rows[0].split()  # the base row opens its group


def test_every_flag_has_an_explanation():
    emitted = set(re.findall(r'flags\.append\("([a-z-]+)"\)', inspect.getsource(evaluate_results.audit)))
    emitted |= set(re.findall(r'"([a-z]+(?:-[a-z]+){2,})"', inspect.getsource(leaderboard._flag_eps_monotonicity)))
    emitted |= set(audit_suite.FLAGS.values())  # the sanity suite's flags (robustify audit / evaluate --audit)
    assert emitted and emitted <= set(FLAG_EXPLANATIONS), sorted(emitted - set(FLAG_EXPLANATIONS))


def test_every_column_and_flag_is_explained_once_in_the_legend(built):
    """One table of explanations (robustify.reporting.legend.LEGEND) for every column of the CSV and every flag,
    and the markdown and the page take their texts from it."""
    names = [(e.kind, e.name) for e in LEGEND]
    assert len(names) == len(set(names))
    csv = pd.read_csv(built / "leaderboard.csv")
    unexplained = [c for c in csv.columns if column_entry(c) is None]
    assert not unexplained, unexplained
    md, html = (built / "leaderboard.md").read_text(), (built / "index.html").read_text()
    for column in csv.columns:
        first = explain_column(column).split("`")[0]  # the text up to its first code span
        assert first in md and str(escape(first)) in html, column
    for flag, text in FLAG_EXPLANATIONS.items():
        assert text in md and str(escape(text.split("`")[0])) in html
    assert "The setting of MeanSparse" in md  # a setting column's owner, from the defense registry


def test_markdown_tables_lead_with_what_a_reader_compares(built):
    """Every table of leaderboard.md has at most 12 columns (it had 34); the first leads with the worst case and its
    interval, the difference to the base row and the verdict."""
    md = (built / "leaderboard.md").read_text()
    headers = [line for line, sep in zip(md.splitlines(), md.splitlines()[1:]) if sep.startswith("|---")]
    assert len(headers) >= 2
    widths = [len(h.strip("|").split("|")) for h in headers]
    assert max(widths) <= MAX_MARKDOWN_COLUMNS, widths
    lead = [c.strip() for c in headers[0].strip("|").split("|")]
    assert lead == ["rank", "model", "defense", "alpha", *LEAD[3:]]
    csv = pd.read_csv(built / "leaderboard.csv")
    shown = {c.strip() for h in headers for c in h.strip("|").split("|")}
    assert {c for c in csv.columns if c.endswith("_acc")} <= shown  # every accuracy is in some table
    assert "| 2 | aa-resnet18 | none |  | 73.0 [66.2, 79.1] | 20.0 [14.6, 26.3] |" in md
    assert "leaderboard.csv` has every column" in md  # said under the table


def test_markdown_folds_the_lead_when_rows_differ_in_everything():
    """Rows that differ in dataset, norm, eps, size and mode would need 14 lead columns: still at most 12."""
    df = build_table(collect(RESULTS))
    for col in ("dataset", "threat_model", "eps", "n_examples", "mode"):
        df[col] = [f"{col}{i}" for i in range(len(df))]
    md = leaderboard.to_markdown(df)
    headers = [line for line, sep in zip(md.splitlines(), md.splitlines()[1:]) if sep.startswith("|---")]
    assert max(len(h.strip("|").split("|")) for h in headers) <= MAX_MARKDOWN_COLUMNS
    assert "| settings | setup |" in headers[0] and "alpha=0.3" in md and "dataset0 threat_model0 eps0" in md


def test_committed_leaderboard_is_what_its_results_rebuild_to(tmp_path, monkeypatch):
    """leaderboard/ in the repository: its tables are rebuilt from leaderboard/results (CSV, markdown, LaTeX)."""
    monkeypatch.chdir(ROOT)  # the CSV records each result's path as the rebuild saw it
    write_leaderboard(Path("leaderboard/results"), tmp_path, plots=False, writers=["csv", "markdown", "latex"])
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.tex"):
        assert (tmp_path / name).read_text() == (ROOT / "leaderboard" / name).read_text(), name


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
    shown = [float(v.split()[0]) for v in _column(browser, "clean_acc")]  # "73.0 [66.3, 79.0]"
    assert shown == sorted(csv["clean_acc"], reverse=True)
    _click(browser, "clean_acc")
    assert [float(v.split()[0]) for v in _column(browser, "clean_acc")] == sorted(csv["clean_acc"])
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
    browser.find_element("id", "every-column").click()  # seconds: behind the toggle
    _click(browser, "seconds")
    assert _column(browser, "seconds") == ["100", "10", "9.5", ""]
    _click(browser, "seconds")
    assert _column(browser, "seconds") == ["9.5", "10", "100", ""]


def test_worst_case_interval_and_verdict_in_view_at_1600_px(browser, built):
    """At 1600 px every row's worst case (with its interval in the cell) and verdict are on screen without scrolling
    (they were at 3600 and 4200 px, behind 14 columns); the per-attack columns wait behind the toggle."""
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    try:
        browser.get((built / "index.html").as_uri())
        assert browser.execute_script("return window.innerWidth") == 1600
        boxes = browser.execute_script(
            "return Array.from(document.querySelectorAll('#leaderboard tr.row')).map(r => "
            "['worst_case_acc', 'verdict'].map(c => { const td = r.querySelector('td.col-' + c); if (!td) return null;"
            " const b = td.getBoundingClientRect(); return [b.left, b.right, b.width, td.textContent.trim()]; }))")
        csv = pd.read_csv(built / "leaderboard.csv")
        assert len(boxes) == len(csv)
        for worst, verdict in boxes:
            for left, right, width, _ in (worst, verdict):
                assert width > 0 and 0 <= left and right <= 1600, (worst, verdict)
            assert re.fullmatch(r"\d+\.\d+ \[\d+\.\d, \d+\.\d\]", worst[3]), worst[3]
        assert {v[3] for _, v in boxes} == set(csv["verdict"].fillna(""))
        attack = browser.find_element(By.CSS_SELECTOR, "#leaderboard thead th.more")
        assert not attack.is_displayed()
        browser.find_element(By.ID, "every-column").click()
        assert attack.is_displayed() and attack.text == "apgd-ce_acc"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
