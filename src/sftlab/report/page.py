"""Self-contained HTML report pages: one file with its plots embedded, that opens offline in any browser.

Plots are matplotlib figures (Agg backend, no display needed); each is written as a PNG next to
the page and embedded in it as a data URI, so the page can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from sftlab.files import atomic_write  # noqa: E402

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #555; } .warn { color: #a35200; } pre { white-space: pre-wrap; background: #f7f7f7; padding: .5em; }
"""


@dataclass
class Page:
    """An HTML page under construction: sections of escaped text, tables and figures."""

    title: str
    parts: list[str] = field(default_factory=list)
    pngs: dict[str, bytes] = field(default_factory=dict)  # file name → PNG bytes, written next to the page
    refresh: int | None = None  # seconds: the browser reloads the page (a live view)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, css: str = "") -> None:
        cls = f' class="{css}"' if css else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Cells are escaped; numbers are right-aligned."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows
        )
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig: "plt.Figure", name: str, alt: str) -> None:
        """Embed ``fig`` (and keep it as ``name``.png); the figure is closed."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        png = buf.getvalue()
        self.pngs[f"{name}.png"] = png
        data = base64.b64encode(png).decode("ascii")
        self.parts.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">')

    def render(self) -> str:
        body = "\n".join(self.parts)
        reload = f'<meta http-equiv="refresh" content="{self.refresh}">' if self.refresh else ""
        return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{reload}<title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")

    def write(self, path: Path) -> list[Path]:
        """Write the page to ``path`` and its PNGs beside it, each atomically; returns every file written."""
        path.parent.mkdir(parents=True, exist_ok=True)
        written = []
        for name, png in self.pngs.items():
            written.append(atomic_write(path.parent / name, png))
        written.append(atomic_write(path, self.render().encode("utf-8")))
        return written


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape(str(value if value is not None else ''))}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:,.4g}</td>'
    return f"<td>{html.escape(str(value))}</td>"




def new_figure(width: float = 7.0, height: float = 3.6) -> tuple["plt.Figure", Any]:
    """A figure with one axes, sized for a report page."""
    fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax
