"""The report page's building blocks: its style sheet, escaping, images, tables, percentages and cards."""

import base64
import html
from pathlib import Path

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1000px;
       margin: 0 auto; padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem;
     margin-top: 2.2rem; } h3 { margin-bottom: .3rem; }
.sub { color: #666; margin-top: 0; } .note { color: #555; font-size: .92rem; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: .6rem .9rem; min-width: 10rem; flex: 1; }
.card b { display: block; font-size: 1.5rem; } .card span { color: #555; font-size: .88rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
img { max-width: 100%; height: auto; display: block; margin: .6rem 0; border: 1px solid #eee; }
.scroll { overflow-x: auto; max-width: 100%; }
code { overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; font-size: .8rem; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5rem .8rem; }
.missing { color: #888; font-style: italic; }
@media print { body { max-width: none; font-size: 11pt; } h2 { break-before: auto; } img, table, .card
  { break-inside: avoid; } details > *:not(summary) { display: block; } }
"""


def _esc(x):
    return html.escape(str(x))


def _img(path, alt):
    path = Path(path)
    if not path.is_file():
        return f'<p class="missing">({_esc(path.name)} not found in the run folder)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _table(header, rows):
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    # the wrapper scrolls a wide table sideways on a phone instead of widening the whole page
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _pct(x, digits=1):
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _card(value, label):
    return f'<div class="card"><b>{_esc(value)}</b><span>{_esc(label)}</span></div>'
