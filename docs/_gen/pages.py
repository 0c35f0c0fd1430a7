"""Run by mkdocs' ``gen-files`` plugin at build time: writes the generated pages (see ``reference.py``)."""

import os
import sys
from pathlib import Path

import mkdocs_gen_files

# the reference documents robustify itself, not the plugins installed beside it (k-WTA has its own how-to)
os.environ["ROBUSTIFY_NO_PLUGINS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402

PAGES = {
    "reference/cli.md": reference.cli_markdown,
    "reference/api.md": reference.api_markdown,
    "reference/leaderboard.md": reference.leaderboard_markdown,
    "reference/result-json.md": reference.result_schema_markdown,
    "benchmarks.md": reference.benchmarks_markdown,
}

for page, make in PAGES.items():
    with mkdocs_gen_files.open(page, "w") as f:
        f.write(make())
    mkdocs_gen_files.set_edit_path(page, "_gen/reference.py")
