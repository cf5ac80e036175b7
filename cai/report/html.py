"""HTML building blocks of the report: escaping, tables, images, the stylesheet.

Everything that comes from data passes through `e`, because red-team prompts and policy outputs
routinely contain markup such as ``<script>``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from cai.records import MetricRow

MAX_TEXT = 400
"""Prompts and responses are cut here in the per-label listing; the audit file has them whole."""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:0;
  background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 28px 48px}
h1{font-size:26px;margin:18px 0 4px}
h2{font-size:20px;margin:30px 0 8px;padding-top:8px;border-top:2px solid #d9dde3}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6573;font-size:12px}
nav{font-size:13px;margin:8px 0 4px}nav a{margin-right:12px;color:#2456a6;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff;font-size:13px}
th,td{border:1px solid #d9dde3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.not-run{color:#8a4b00;background:#fff4e0;border:1px solid #f0d6a8;padding:6px 10px;display:inline-block;
  border-radius:4px}
.plot{max-width:100%;height:auto;background:#fff;border:1px solid #d9dde3}
.label{background:#fff;border:1px solid #d9dde3;border-radius:4px;padding:8px 12px;margin:10px 0}
.contested{color:#b3261e;font-weight:600}.bad{color:#b3261e}
.banner{background:#fdecea;border:2px solid #b3261e;color:#5f1410;padding:10px 14px;margin:12px 0;
  border-radius:6px;font-size:15px}.banner b{color:#b3261e}
.text{white-space:pre-wrap;word-break:break-word}
ol.responses{margin:4px 0 6px 0;padding-left:28px}
table.heatmap td.hm{min-width:56px;text-align:center;font-variant-numeric:tabular-nums;vertical-align:middle}
table.heatmap td.self{background:#eef1f5}table.heatmap td.few{background:#f1f1f1;color:#5b6573}
table.heatmap .n{font-size:11px;color:#5b6573}table.heatmap th.unit{white-space:nowrap}
"""


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any) -> str:
    """Numbers in tables: 4 significant digits for floats, plain for the rest."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return e(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return e(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """A table of escaped cells; `numeric` column indexes are right-aligned and number-formatted."""
    numeric = set(numeric)
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{num(cell)}</td>' if n in numeric else f"<td>{e(cell)}</td>"
            for n, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def not_run(what: str) -> str:
    return f'<p class="not-run">not run: {e(what)}</p>'


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{e(alt)}" src="data:image/png;base64,{data}">'


def ci(row: MetricRow) -> str:
    if row.ci_low is None or row.ci_high is None:
        return "–"
    width = max(abs(row.ci_low), abs(row.ci_high))
    digits = 0 if width >= 100 else 1 if width >= 10 else 3
    return f"{row.ci_low:.{digits}f} – {row.ci_high:.{digits}f}"


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
