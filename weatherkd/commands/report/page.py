"""``report.html``: the report as one self-contained page (figures inlined as base64 PNG), which
opens offline in any browser. Its tables are the markdown report's own (the ± columns and the
paired differences included), rendered to HTML; its figures are ``figures``'."""

from __future__ import annotations

import base64
import html
import re

from weatherkd.commands.report.figures import Drawn

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1500px;
       padding: 0 1.5em; color: #1a1a1a; background: #fff; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; } tbody tr:nth-child(even) { background: #fafafa; }
code { background: #f4f4f4; padding: 0 .2em; border-radius: 3px; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; max-width: 1100px; margin-top: .4em; }
.note { color: #8a4b00; } .scroll { overflow-x: auto; }
"""


def _inline(text: str) -> str:
    """Escape, then the markdown the report uses inline: `code` and **bold**."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_to_html(text: str) -> str:
    """The subset of markdown that ``report.markdown`` writes: tables, ``###`` headings, paragraphs."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = block[0], [r for r in block[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r)
                                                          + "</tr>" for r in body) + "</tbody></table></div>")
            continue
        if line.startswith("#"):
            level = min(4, len(line) - len(line.lstrip("#")))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _figure(d: Drawn) -> str:
    data = base64.b64encode(d.png).decode("ascii")
    return (f'<figure id="{d.name}"><img alt="{html.escape(d.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_inline(d.caption)}</figcaption></figure>")


def page(report: dict, text: str, figures: list[Drawn], notes: list[str] = ()) -> str:
    """The whole page: the tables (``text``, the markdown report), then the figures."""
    by_name = {d.name: d for d in figures}
    sections = [("The table", markdown_to_html(text))]
    for title, names in (("Quality against cost", ["frontier"]), ("Gain over identity, per weather", ["gains"]),
                         ("Restorations", [n for n in by_name if n.startswith("grid")]),
                         ("Clean in", ["clean-in"])):
        shown = [_figure(by_name[n]) for n in names if n in by_name]
        if shown:
            sections.append((title, "\n".join(shown)))
    if notes:
        sections.append(("Not drawn", "\n".join(f'<p class="note">{_inline(n)}</p>' for n in notes)))
    title = f"weatherkd report, {report.get('date', '')}"
    body = "\n".join(f"<h2>{html.escape(t)}</h2>\n{content}" for t, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{_STYLE}</style>\n</head>\n'
            f"<body>\n<h1>{html.escape(title)}</h1>\n<p>Protocol <code>{html.escape(str(report.get('protocol')))}"
            f"</code>, {report.get('n')} test samples; costs measured on {html.escape(str(report.get('device')))} "
            f"({html.escape(str(report.get('machine')))}).</p>\n{body}\n</body>\n</html>\n")
