"""The course as a site (minitransformer/tools/coursesite.py): `course site OUT_DIR` builds, from
the committed notebooks, an index in reading order and one page per notebook with previous/next
links, outputs and figures embedded and every formula converted to MathML; it writes nothing that
is not its own. Then headless Chromium opens every page with the network cut off and the test reads
what a reader would see: the maths laid out as maths, no TeX left in the text, no request made."""
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from minitransformer.__main__ import main as cli
from minitransformer.tools import course, coursesite, files

NOTEBOOKS = sorted(course.NOTEBOOKS.glob("*.ipynb"))
PAGES = [p.with_suffix(".html").name for p in NOTEBOOKS]


def linked_documents():
    """The pages of the Markdown files of the repository that the notebooks link to (the
    notation table): [file name]."""
    found = set()
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            for target in re.findall(r"\]\(([^)\s#:]+\.md)", cell.source if cell.cell_type == "markdown" else ""):
                doc = (path.parent / target).resolve()
                if doc.is_file() and files.ROOT in doc.parents:
                    found.add(doc.stem + ".html")
    return sorted(found)


DOCUMENTS = linked_documents()
BUILD_SECONDS = 120  # from a clean clone, the whole site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "course"
    start = time.perf_counter()
    assert cli(["course", "site", str(out)]) == 0
    assert time.perf_counter() - start < BUILD_SECONDS
    return out


def read(site, name):
    return (site / name).read_text(encoding="utf-8")


def formulas(nb):
    """[(formula, display?)] of a notebook's Markdown cells, as Jupyter's Markdown reads them."""
    found = []
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class Collect(IPythonRenderer):
        def block_math(self, body):
            found.append((body, True))
            return ""

        def inline_math(self, body):
            found.append((body, False))
            return ""

    for cell in nb.cells:
        if cell.cell_type == "markdown":
            MarkdownWithMath(renderer=Collect(escape=False)).render(cell.source)
    return found


# ----------------------------------------------------------------------------- the files built


def test_the_site_has_an_index_and_a_page_per_notebook_in_reading_order(site):
    assert sorted(p.name for p in site.iterdir()) == sorted(["index.html", *PAGES, *DOCUMENTS])
    index = read(site, "index.html")
    links = re.findall(r'<li><a href="([^"]+)">', index)
    assert links == PAGES
    for name in DOCUMENTS:  # the notation table, say: named on the index
        assert f'<a href="{name}">' in index
    for path in NOTEBOOKS:  # what each unit teaches, from the notebook itself
        title, summary = coursesite.title_and_summary(nbformat.read(path, as_version=4))
        assert title and len(summary) > 40, path.name
        assert coursesite.html.escape(title) in index


@pytest.mark.parametrize("i", range(len(NOTEBOOKS)), ids=lambda i: PAGES[i])
def test_each_page_links_its_neighbours_and_embeds_its_outputs(site, i):
    text = read(site, PAGES[i])
    prev = re.findall(r'<a rel="prev" href="([^"]+)"', text)
    nxt = re.findall(r'<a rel="next" href="([^"]+)"', text)
    assert prev == ([PAGES[i - 1]] * 2 if i > 0 else [])  # top and bottom
    assert nxt == ([PAGES[i + 1]] * 2 if i + 1 < len(PAGES) else [])
    nb = nbformat.read(NOTEBOOKS[i], as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert text.count('<img alt="a figure" src="data:image/png;base64,') == images
    for cell in nb.cells:  # every printed output is on the page (a figure's text/plain is not)
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            shown = o.get("text") or ("" if "image/png" in data else data.get("text/plain", ""))
            for line in filter(str.strip, "".join(shown).splitlines()[:3]):
                assert coursesite.html.escape(line) in text, line
    # nothing to fetch: no script, no stylesheet or image from anywhere but the page itself
    assert "<script" not in text
    assert not re.search(r'(?:src|srcset)\s*=\s*"(?!data:)', text)
    assert not re.search(r"<link\b|@import|url\(", text)


@pytest.mark.parametrize("i", range(len(NOTEBOOKS)), ids=lambda i: PAGES[i])
def test_every_formula_became_mathml(site, i):
    text = read(site, PAGES[i])
    expected = formulas(nbformat.read(NOTEBOOKS[i], as_version=4))
    assert len(expected) > 0
    assert text.count("<math ") == len(expected)
    assert text.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">') == \
        sum(display for _, display in expected)
    assert 'class="tex"' not in text  # no formula left as TeX


def test_a_formula_the_converter_cannot_read_is_left_as_tex_and_reported():
    assert coursesite.tex_to_mathml(r"\frac{a}{b}", display=False).startswith("<math")
    assert "&amp;" in coursesite.tex_to_mathml(r"\text{Add \& Norm}", display=True)
    assert coursesite.tex_to_mathml(r"\notacommand{x}", display=False) is None
    assert coursesite.tex_to_mathml(r"\left( x", display=False) is None
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T\n\nSay $\\notacommand{x}$ and $y$.")])
    text, converted, raw = coursesite.page(nb, "T")
    assert (converted, raw) == (1, [r"\notacommand{x}"])
    assert '<code class="tex">$\\notacommand{x}$</code>' in text


def test_every_link_inside_the_site_leads_to_one_of_its_pages(site):
    for path in site.iterdir():
        for href in re.findall(r'href="([^"]+)"', read(site, path.name)):
            target = href.split("#")[0]
            if target and not re.match(r"[a-z]+:", target):  # not http:, mailto:, an anchor
                assert (site / target).is_file(), (path.name, href)


def test_a_markdown_file_a_notebook_links_to_becomes_a_page(tmp_path):
    """docs/notation.md, linked from a notebook as ../docs/notation.md, is a page of the site."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notation.md").write_text("# Notation\n\n| symbol | meaning |\n|---|---|\n"
                                                  "| $d_\\mathrm{in}$ | width in |\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "# One\n\nThe symbols: [the table](../docs/notation.md#sizes); $x^2$. Next: [two](02_two.ipynb).")])
    nbformat.write(nb, tmp_path / "notebooks" / "01_one.ipynb")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Two")]),
                   tmp_path / "notebooks" / "02_two.ipynb")
    written, formulas, raw = coursesite.build(tmp_path / "site", tmp_path / "notebooks")
    assert sorted(p.name for p in written) == ["01_one.html", "02_two.html", "index.html", "notation.html"]
    assert (formulas, raw) == (3, [])  # x^2 on its page and in the index (its summary), d_in
    one = (tmp_path / "site" / "01_one.html").read_text()
    assert 'href="notation.html#sizes"' in one and 'href="02_two.html"' in one
    notation = (tmp_path / "site" / "notation.html").read_text()
    assert "<title>Notation</title>" in notation and "<math " in notation and "<table>" in notation
    assert 'href="notation.html">Notation</a>' in (tmp_path / "site" / "index.html").read_text()


# ----------------------------------------------------------------------------- what it writes


def test_building_again_replaces_its_own_pages(site, capsys):
    before = {p.name: p.read_bytes() for p in site.iterdir()}
    assert cli(["course", "site", str(site)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {len(PAGES) + len(DOCUMENTS) + 1} pages into ") and ", 0 left as TeX" in out
    assert {p.name: p.read_bytes() for p in site.iterdir()} == before  # the same build, bit for bit


@pytest.mark.parametrize("where", ["notebooks", "notebooks/site", "package"])
def test_notebooks_and_shipped_folders_are_refused(where, capsys):
    out = {"notebooks": course.NOTEBOOKS, "notebooks/site": course.NOTEBOOKS / "site",
           "package": files.PACKAGE / "site"}[where]
    assert cli(["course", "site", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minitransformer course: error: OUT_DIR")
    assert not out.exists() or out == course.NOTEBOOKS
    assert not list(course.NOTEBOOKS.glob("*.html"))


def test_a_file_it_did_not_write_is_never_replaced(tmp_path, capsys):
    mine = tmp_path / "index.html"
    mine.write_text("<p>my own index</p>")
    assert cli(["course", "site", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to replace it" in err
    assert mine.read_text() == "<p>my own index</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]  # nothing written beside it


# ----------------------------------------------------------------------------- in a browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                                    reason="Debian's chromium is not installed (apt-get install "
                                           "chromium; .ci/run installs it, and in CI its absence fails)")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ending in a NUL byte, ours on fd 3, its answers on fd 4), so no package and no
    port are needed. The network is cut: every host resolves to nothing, every proxy is a dead port."""

    def __init__(self, profile):
        assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
        ours_r, theirs_w = os.pipe()  # Chromium writes fd 4, we read
        theirs_r, ours_w = os.pipe()  # we write, Chromium reads fd 3

        def fds():  # in the child: its ends on fds 3 and 4, through copies above them (either may be 3 or 4)
            import fcntl
            r, w = fcntl.fcntl(theirs_r, fcntl.F_DUPFD, 10), fcntl.fcntl(theirs_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
             f"--user-data-dir={profile}", "--hide-scrollbars", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, pass_fds=(3, 4))
        os.close(theirs_r)
        os.close(theirs_w)
        self.out, self.inp = os.fdopen(ours_w, "wb"), os.fdopen(ours_r, "rb")
        self.next_id, self.buffer, self.events = 0, b"", []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable", session=True)

    def _message(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp.fileno()], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.inp.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, session=False, timeout=60, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.out.write(json.dumps(message).encode() + b"\0")
        self.out.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method:
                    self.events.remove(e)
                    return e
            self.events.append(self._message(deadline))

    def open(self, url):
        """Load url, wait for its load event -> [every URL the page requested]."""
        self.events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def screenshot(self, path, clip):
        """clip: {x, y, width, height} in CSS pixels of the page."""
        import base64
        data = self.send("Page.captureScreenshot", session=True, format="png",
                         clip={**clip, "scale": 1}, captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.inp.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


# What a reader sees, read in the page: the prose's visible text; every <math> element, whether
# Chromium made it a MathML element with a box, and any backslash command left in its text; every
# fraction, whether its numerator is drawn above its denominator (laid out as maths, not as a line).
READ_PAGE = """(() => {
  const prose = [...document.querySelectorAll('.markdown, ol.units')].map(e => e.innerText).join('\\n');
  const math = [...document.querySelectorAll('math')];
  const fractions = [...document.querySelectorAll('mfrac')].filter(f => f.children.length === 2);
  return {
    prose,
    math: math.length,
    mathml: math.filter(m => m instanceof MathMLElement).length,
    drawn: math.filter(m => m.getBoundingClientRect().width > 0 && m.getBoundingClientRect().height > 0).length,
    tex_in_math: math.map(m => m.textContent).filter(t => /\\\\[A-Za-z]/.test(t)),
    fractions: fractions.length,
    stacked: fractions.filter(f => f.children[0].getBoundingClientRect().bottom
                                   <= f.children[1].getBoundingClientRect().top + 1).length,
  };
})()"""
RAW_TEX = re.compile(r"\\[A-Za-z]+|\$|\\\(|\\\[|[_^]\{")


@needs_chromium
@pytest.mark.parametrize("name", ["index.html", *PAGES, *DOCUMENTS])
def test_chromium_shows_the_maths_rendered_with_no_network(site, browser, name):
    requested = browser.open((site / name).resolve().as_uri())
    assert [url[:80] for url in requested if not url.startswith(("file:", "data:"))] == []
    seen = browser.evaluate(READ_PAGE)
    expected = read(site, name).count("<math ")
    assert seen["math"] == seen["mathml"] == seen["drawn"] == expected
    assert name == "index.html" or expected > 0
    assert seen["tex_in_math"] == []
    assert seen["stacked"] == seen["fractions"]
    assert len(seen["prose"]) > 200
    raw = [seen["prose"][max(m.start() - 30, 0):m.end() + 30] for m in RAW_TEX.finditer(seen["prose"])]
    assert raw == [], raw[:5]
