"""How edgeq's results read in the Prefect UI: rounded table cells, markdown that renders, progress bars."""

from __future__ import annotations

import base64
import math
import numbers
import textwrap
import time
from typing import Any, Iterable, Mapping
from uuid import UUID

# Markdown renders a lone "-" cell as a list bullet; a missing value reads as this instead.
MISSING = "n/a"
# The Prefect UI shows table cells on one line; a longer text pushes the table past the page's width.
CELL_CHARS = 64


def display_value(v: Any, digits: int = 4) -> Any:
    """One table cell for people: floats to `digits` significant digits (still numbers, so columns sort), None and
    "-" as MISSING, lists joined."""
    if v is None or (isinstance(v, str) and v.strip() in ("", "-")):
        return MISSING
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if not math.isfinite(f) else float(f"{f:.{digits}g}")
    if isinstance(v, (list, tuple)):
        return ", ".join(str(display_value(x, digits)) for x in v) or MISSING
    return v


def display_rows(rows: Iterable[Mapping[str, Any]], digits: int = 4) -> list[dict[str, Any]]:
    """Rows of a table artifact, every cell through `display_value`."""
    return [{k: display_value(v, digits) for k, v in row.items()} for row in rows]


def short_text(text: str | None, width: int = CELL_CHARS) -> str:
    """A one-line cell that fits the UI's table; the full text belongs in the markdown report beside it."""
    if not text:
        return MISSING
    return textwrap.shorten(" ".join(str(text).split()), width, placeholder=" …")


def md_cell(v: Any, digits: int = 4) -> str:
    v = display_value(v, digits)
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> list[str]:
    """A markdown table (as lines) of `rows`, the cells as `md_cell` shows them."""
    if not rows:
        return []
    columns = columns or list(rows[0])
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(md_cell(r.get(c)) for c in columns) + " |" for r in rows])


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_markdown(png: bytes, alt: str) -> str:
    """An image embedded in markdown (a data URI): the UI shows it where a file path or link could not be opened."""
    return f"![{alt}]({png_data_uri(png)})"


class UIProgress:
    """A Prefect progress artifact: a bar on the run's Artifacts tab for a stage that takes a while.

    Updates are throttled (the UI polls; one a second is plenty) except the last one.
    """

    def __init__(self, key: str, description: str, min_interval_s: float = 1.0):
        from prefect.artifacts import create_progress_artifact

        self.key = key
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self.id: UUID = create_progress_artifact(progress=0.0, key=key, description=description)

    def update(self, percent: float, description: str | None = None, force: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        update_progress_artifact(self.id, progress=max(0.0, min(100.0, float(percent))), description=description)
