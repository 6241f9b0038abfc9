"""The course as a web site that reads offline: `python -m minitransformer course site OUT_DIR`.

    build(out_dir)                 notebooks/*.ipynb -> OUT_DIR/index.html + one page per notebook
    page(nb, title, prev, nxt)     one notebook -> (HTML text, formulas converted, formulas left as TeX)
    document(path, state)          a Markdown file a page links to (the notation table) -> its page
    tex_to_mathml(tex, display)    one formula -> MathML, or None when some of it stayed TeX

The maths is converted to MathML when the site is built (latex2mathml), so a page needs no script,
no font download and no network: a browser that renders MathML Core (Chromium, Firefox, Safari)
draws it. Figures and outputs are embedded in the page (PNG as data: URIs); nothing is fetched.

The pages come in the notebooks' order (their file names sort as the reading order); index.html
lists them with what each teaches, taken from the notebook itself: the paragraph that opens with
"What this unit teaches", else the first paragraph after the title. A Markdown file of the
repository that a page links to (docs/notation.md) becomes a page too, and the link points at it.

Writing: every page is built before any is written, then each is written whole (files.write_text).
A page carries a generator mark; an existing file without it is refused, never replaced, and so
are notebooks/ and the shipped folders (files.SHIPPED).
"""
import base64
import html
import re
import time
from pathlib import Path

from . import cli, files

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"  # the course, in a source checkout
GENERATOR = '<meta name="generator" content="minitransformer course site">'  # marks our own pages
TEX_LEFT = re.compile(r"\\[A-Za-z]+")  # a TeX command the converter passed through as text
TEXT_ESCAPE = re.compile(r"\\([&%$#_{}])")  # \& in \text{..}: latex2mathml 3.81 keeps the backslash
ORDINARY = re.compile(r'<mo((?: (?:stretchy|fence)="false")*)>(&#x0007C;|&#x02016;|&#x0002F;)</mo>')
TEACHES = "What this unit teaches"
LIST = re.compile(r"(\d+\.|[-*+])\s")  # a Markdown list item
MATH_FONTS = '"Latin Modern Math", "STIX Two Math", "DejaVu Math TeX Gyre", "Cambria Math", math'


# ----------------------------------------------------------------------------- maths


def tex_to_mathml(tex, display):
    """One formula (no $ signs) -> a <math> element as text, or None when the converter failed
    or left a TeX command in the text it produced."""
    import latex2mathml.converter
    try:
        mathml = latex2mathml.converter.convert(tex, display="block" if display else "inline")
    except Exception:  # any formula it cannot parse: reported by the caller, page still built
        return None
    mathml = re.sub(r"(<mtext>)(.*?)(</mtext>)",
                    lambda m: m[1] + TEXT_ESCAPE.sub(lambda e: html.escape(e[1]), m[2]) + m[3], mathml)
    # TeX spaces |, \| and / as ordinary symbols and \infty as a letter; latex2mathml makes them
    # operators, which a browser spaces out ("u | f | / h", "- oo")
    mathml = ORDINARY.sub(r'<mo lspace="0" rspace="0"\1>\2</mo>', mathml).replace(
        "<mo>&#x0221E;</mo>", "<mi>&#x0221E;</mi>")
    text = html.unescape(re.sub(r"<[^>]+>", "", mathml))
    return None if TEX_LEFT.search(text) else mathml


def _markdown(renderer_state):
    """A Markdown -> HTML function (nbconvert's parser, which reads $..$ and $$..$$ as Jupyter
    does) whose formulas become MathML, counted in renderer_state ({"math": n, "raw": [tex]}).
    With renderer_state["root"] (a folder), a link to a Markdown file inside it (the notation
    table, say) points at that file's page, recorded in renderer_state["docs"] {path: page}."""
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class Renderer(IPythonRenderer):
        def _math(self, tex, display):
            mathml = tex_to_mathml(tex, display)
            if mathml is None:
                renderer_state["raw"].append(tex)
                delim = "$$" if display else "$"
                return f'<code class="tex">{self.escape_html(delim + tex + delim)}</code>'
            renderer_state["math"] += 1
            return mathml

        def block_math(self, body):
            return self._math(body, True)

        def inline_math(self, body):
            return self._math(body, False)

        def latex_environment(self, name, body):
            return self._math(f"\\begin{{{name}}}{body}\\end{{{name}}}", True)

        def heading(self, text, level, **attrs):  # nbconvert's anchor (ElementTree) mangles MathML
            anchor = html.escape("-".join(html.unescape(re.sub(r"<[^>]+>", "", text)).split()))
            return (f'<h{level} id="{anchor}">{text}<a class="anchor-link" href="#{anchor}">#</a>'
                    f'</h{level}>\n')

        def link(self, text, url, title=None):  # another notebook or document of the course: its page
            url = re.sub(r"^([\w-]+)\.ipynb(?=$|#)", r"\1.html", url)
            target, hash_, fragment = url.partition("#")
            root = renderer_state.get("root")
            if root and target.endswith(".md") and ":" not in target:
                doc = (Path(self.path) / target).resolve()
                if doc.is_file() and root in doc.parents:
                    url = renderer_state["docs"].setdefault(doc, doc.stem + ".html") + hash_ + fragment
            return super().link(text, url, title)

    def render(source, attachments=None, path=""):
        renderer = Renderer(escape=False, embed_images=True, path=path, attachments=attachments)
        return MarkdownWithMath(renderer=renderer).render(source)
    return render


# ----------------------------------------------------------------------------- cells and outputs


def _pre(text, cls):
    return f'<pre class="{cls}">{html.escape(text)}</pre>'


def _output(output, markdown):
    """One output of a code cell -> HTML (images embedded)."""
    from nbconvert.filters.ansi import ansi2html, strip_ansi
    kind = output.get("output_type")
    if kind == "stream":
        return _pre(strip_ansi(output.get("text", "")), f"output {output.get('name', 'stdout')}")
    if kind == "error":
        traceback = "\n".join(output.get("traceback", []))
        return f'<pre class="output error">{ansi2html(traceback)}</pre>'
    data = output.get("data", {})
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            value = data[mime]
            encoded = ("".join(value) if isinstance(value, list) else value).replace("\n", "")
            base64.b64decode(encoded, validate=True)  # a malformed image fails the build, not the reader
            return f'<div class="output"><img alt="a figure" src="data:{mime};base64,{encoded}"></div>'
    if "image/svg+xml" in data:
        return f'<div class="output">{"".join(data["image/svg+xml"])}</div>'
    if "text/html" in data:
        return f'<div class="output">{"".join(data["text/html"])}</div>'
    if "text/markdown" in data:
        return f'<div class="output">{markdown("".join(data["text/markdown"]))}</div>'
    if "text/plain" in data:
        return _pre(strip_ansi("".join(data["text/plain"])), "output")
    return ""


def _code(source):
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    return highlight(source, PythonLexer(), HtmlFormatter(cssclass="highlight"))


def _cells(nb, markdown, path):
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(f'<div class="markdown">{markdown(cell.source, cell.get("attachments"), path)}</div>')
        elif cell.cell_type == "code":
            outputs = "".join(_output(o, markdown) for o in cell.get("outputs", []))
            parts.append(f'<div class="code">{_code(cell.source)}{outputs}</div>')
    return "\n".join(parts)


# ----------------------------------------------------------------------------- pages


def title_and_summary(nb):
    """-> (the notebook's title: its first heading, as text; what it teaches: Markdown, the
    paragraph that says so, else the first one, with the list it announces when it ends in ':')."""
    title, blocks = None, []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for block in re.split(r"\n\s*\n", cell.source.strip()):
            heading = re.match(r"#+\s+(.*)", block)
            if heading and title is None:
                title = heading[1].strip()
            elif not heading:
                blocks.append(block.strip())
        if title and blocks:
            break
    prose = [i for i, b in enumerate(blocks) if not b.startswith(("|", "```", "<", "$$", "!")) and not LIST.match(b)]
    teaches = [i for i in prose if TEACHES in blocks[i][:60]]
    if not (teaches or prose):
        return title, ""
    i = (teaches or prose)[0]
    summary = re.sub(rf"^\W*{TEACHES}\W*\s*", "", blocks[i])
    if summary.endswith(":") and i + 1 < len(blocks) and LIST.match(blocks[i + 1]):
        summary += "\n\n" + blocks[i + 1]
    return title, summary


def _html(title, body):
    from pygments.formatters import HtmlFormatter
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{GENERATOR}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ max-width: 52rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; color: #1d1d1f;
       font: 16px/1.55 system-ui, sans-serif; }}
math {{ font-family: {MATH_FONTS}; font-size: 1.08em; }}
math[display="block"] {{ margin: 0.8em 0; overflow-x: auto; overflow-y: hidden; }}
menclose[notation="box"] {{ border: 1px solid currentColor; padding: 0.15em 0.3em; }}
nav {{ display: flex; justify-content: space-between; gap: 1rem; padding: 0.6rem 0; font-size: 0.95em;
      border-bottom: 1px solid #ddd; }}
nav.bottom {{ border-top: 1px solid #ddd; border-bottom: 0; margin-top: 2rem; }}
a {{ color: #0b57d0; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 0.93em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; }}
code {{ font-size: 0.92em; }}
.code {{ margin: 0.8em 0; }}
.highlight {{ background: #f6f8fa; border-left: 3px solid #9aa8b8; }}
.highlight pre {{ margin: 0; padding: 0.5em 0.8em; overflow-x: auto; }}
pre.output {{ margin: 0; padding: 0.4em 0.8em; overflow-x: auto; border-left: 3px solid #e3e3e3; font-size: 0.9em; }}
pre.stderr, pre.error {{ background: #fff3f3; }}
div.output img {{ max-width: 100%; }}
code.tex {{ color: #a00; }}
a.anchor-link {{ visibility: hidden; margin-left: 0.3em; text-decoration: none; }}
h1:hover a.anchor-link, h2:hover a.anchor-link, h3:hover a.anchor-link {{ visibility: visible; }}
ol.units li {{ margin-bottom: 0.8em; }}
{HtmlFormatter(cssclass="highlight").get_style_defs(".highlight")}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _nav(prev, nxt, where):
    """prev, nxt: (file name, title) or None."""
    left = f'<a rel="prev" href="{prev[0]}">&larr; {html.escape(prev[1])}</a>' if prev else "<span></span>"
    right = f'<a rel="next" href="{nxt[0]}">{html.escape(nxt[1])} &rarr;</a>' if nxt else "<span></span>"
    return f'<nav class="{where}">{left}<a href="index.html">Contents</a>{right}</nav>'


def page(nb, title, prev=None, nxt=None, path="", state=None):
    """One notebook -> (HTML text, number of formulas converted, [formulas left as TeX]).
    state: a renderer state shared by the pages of a site (see _markdown), or None."""
    state = {"math": 0, "raw": []} if state is None else state
    math, raw = state["math"], len(state["raw"])
    body = _cells(nb, _markdown(state), path)
    text = _html(title, f"{_nav(prev, nxt, 'top')}\n<main>\n{body}\n</main>\n{_nav(prev, nxt, 'bottom')}")
    return text, state["math"] - math, state["raw"][raw:]


def document(path, state):
    """A Markdown file of the repository (the notation table) -> (title, HTML text)."""
    source = Path(path).read_text(encoding="utf-8")
    heading = re.search(r"^#+\s+(.*)$", source, re.MULTILINE)
    title = heading[1].strip() if heading else Path(path).stem
    body = _markdown(state)(source, None, str(Path(path).parent))
    nav = _nav(None, None, "top")
    return title, _html(title, f"{nav}\n<main>\n<div class=\"markdown\">{body}</div>\n</main>")


def index(units, documents=()):
    """units: [(file name, title, summary as HTML)]; documents: [(file name, title)] -> HTML text."""
    items = "\n".join(f'<li><a href="{name}">{html.escape(title)}</a>{summary}</li>'
                      for name, title, summary in units)
    also = "".join(f'<p>Beside them: <a href="{name}">{html.escape(title)}</a>.</p>\n' for name, title in documents)
    body = (f"<h1>minitransformer: the course</h1>\n<p>Read the units in this order. Each derives a piece, "
            f"checks it, uses it, and ends with exercises; these pages show the notebooks with their "
            f"solutions and outputs.</p>\n<ol class=\"units\">\n{items}\n</ol>\n{also}")
    return _html("minitransformer: the course", body)


# ----------------------------------------------------------------------------- the site


def is_site_page(path):
    """Did this command write the file at path? (the same_kind test of files.check_output)"""
    if not Path(path).is_file():  # a FIFO or a device is not ours, and opening one could block
        return False
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(2000)
    except OSError:
        return False


def _check(out_dir, names):
    """Refuse (UsageError) an OUT_DIR in shipped work, or one holding a file of one of these names
    that this command did not write."""
    files.check_output_dir(out_dir, "OUT_DIR", {name: (is_site_page, "a page of this course site")
                                                for name in names}, overwrite=None)


def build(out_dir, notebooks=NOTEBOOKS):
    """Write OUT_DIR/index.html, one page per notebooks/*.ipynb and one per Markdown file of the
    repository that a page links to -> (paths written, formulas converted, [(page, formula left
    as TeX)]). Every page is made and every check done before any file is written."""
    import nbformat
    out_dir, notebooks = Path(out_dir), Path(notebooks)
    if out_dir.resolve() == notebooks.resolve() or notebooks.resolve() in out_dir.resolve().parents:
        raise cli.UsageError(f"OUT_DIR must lie outside {notebooks.name}/, got {cli.shown(out_dir)}")
    sources = sorted(notebooks.glob("*.ipynb"))
    if not sources:
        raise ValueError(f"no notebook in {cli.shown(notebooks)}")
    names = ["index.html", *(p.with_suffix(".html").name for p in sources)]
    _check(out_dir, names)  # before the work; the documents' pages again once they are known
    books = [nbformat.read(p, as_version=4) for p in sources]
    units = [(p.with_suffix(".html").name, *title_and_summary(nb)) for p, nb in zip(sources, books)]
    units = [(name, title or Path(name).stem, summary) for name, title, summary in units]
    state = {"math": 0, "raw": [], "root": notebooks.resolve().parent, "docs": {}}
    pages, raw = {}, []
    for i, (source, nb) in enumerate(zip(sources, books)):
        prev = units[i - 1][:2] if i > 0 else None
        nxt = units[i + 1][:2] if i + 1 < len(units) else None
        pages[units[i][0]], _, left = page(nb, units[i][1], prev, nxt, str(source.parent), state)
        raw += [(units[i][0], tex) for tex in left]
    before = len(state["raw"])
    summaries = [_markdown(state)(summary, None, str(notebooks)) for _, _, summary in units]
    raw += [("index.html", tex) for tex in state["raw"][before:]]
    documents, done = [], set()
    while pending := [doc for doc in state["docs"] if doc not in done]:  # a document may link another
        for doc in pending:
            done.add(doc)
            name, before = state["docs"][doc], len(state["raw"])
            if name in pages or name == "index.html":
                raise ValueError(f"{cli.shown(doc)}: its page {name} would replace another page of the site")
            title, pages[name] = document(doc, state)
            documents.append((name, title))
            raw += [(name, tex) for tex in state["raw"][before:]]
    pages = {"index.html": index([(n, t, h) for (n, t, _), h in zip(units, summaries)], documents), **pages}
    _check(out_dir, pages)
    written = []
    for name, text in pages.items():
        files.write_text(out_dir / name, text)
        written.append(out_dir / name)
    return written, state["math"], raw


def add_parser(sub):
    """The `course site` subcommand, on course.py's subparsers."""
    site = sub.add_parser(
        "site", help="write the course as HTML pages that read offline, maths rendered",
        description="Write OUT_DIR/index.html (the reading order, what each unit teaches) and one "
                    "page per notebook, with its outputs and figures embedded and its maths "
                    "converted to MathML: no script, no network. An existing file that this "
                    "command did not write is refused; OUT_DIR may not be notebooks/ or shipped work.")
    site.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write the site into")


def run(args):
    start = time.perf_counter()
    written, formulas, raw = build(args.out_dir)
    for name, tex in raw:
        print(f"{name}: a formula left as TeX: ${tex}$")
    print(f"wrote {len(written)} pages into {cli.shown(args.out_dir)} in {time.perf_counter() - start:.1f} s: "
          f"{formulas} formulas as MathML, {len(raw)} left as TeX; open {cli.shown(written[0])}")
    return 1 if raw else 0
