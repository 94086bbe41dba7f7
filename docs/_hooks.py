"""mkdocs hook: serve the figures under ``reports/`` next to the results pages that include the reports.

A results page ``docs/results/<dir>/index.md`` includes ``reports/<dir>/<report>.md`` with the snippets
extension; that report's relative image links (``loss_curves.png``) then resolve to
``results/<dir>/loss_curves.png``, which this hook adds to the site from ``reports/<dir>/`` (no copies in git).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def on_files(files, config):
    for png in sorted(REPORTS.rglob("*.png")):
        uri = "results/" + png.relative_to(REPORTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
