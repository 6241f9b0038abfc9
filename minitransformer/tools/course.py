"""The course's commands: the student copies of the notebooks, and clean committed outputs.

    python -m minitransformer course student OUT_DIR        # copies without solutions, outputs cleared
    python -m minitransformer course run [NOTEBOOK ...]     # execute in place, then clean (default: all)
    python -m minitransformer course site OUT_DIR           # the course as HTML pages (coursesite.py)

For nbgrader, the student copy marks each cell holding a solution's markers as a solution cell
("Autograded answer") and the code cell after it, the checker, as a locked one ("Read-only"): a
teacher can run nbgrader on the copies as they are, provided no other line holds a marker's words
(nbgrader takes any such line for a marker, prose included; the student command names each one).

A solution sits between a line `### BEGIN SOLUTION` and a line `### END SOLUTION` (nbgrader's
markers). The student copy keeps the two markers and replaces what lies between them by one line
`raise NotImplementedError`, indented like the BEGIN line, so that a solution written as the body
of a `def` leaves a function that raises, and the checker in the next cell says "not implemented
yet". The notebooks in notebooks/ are only read; OUT_DIR may not be notebooks/ or lie inside it.

`course run` executes each notebook top to bottom from its own folder (as nbval does), then
cleans it for committing: every execution count null, notebook metadata reduced to the kernel,
cell metadata to their tags (`--no-execute`: clean only). It refuses to write a notebook whose
outputs hold an absolute path of this machine (a path would make the outputs differ on every
other machine, and leak).
"""
import re
import sys
import tempfile
import time
from pathlib import Path

from . import cli

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"  # the course, in a source checkout
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}

# ----------------------------------------------------------------------------- student copies


def strip_solutions(source, where="cell"):
    """source with what lies between each BEGIN and END SOLUTION marker replaced by `raise
    NotImplementedError` (indented like the BEGIN line; the markers kept) -> (new source, number
    of regions). Raises ValueError on a marker without its partner."""
    out, regions, inside = [], 0, False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{where}: {BEGIN!r} inside another solution")
            inside, regions = True, regions + 1
            indent = line[:len(line) - len(line.lstrip())]
            out += [line, f"{indent}raise NotImplementedError\n"]
        elif stripped == END:
            if not inside:
                raise ValueError(f"{where}: {END!r} without a {BEGIN!r} before it")
            inside = False
            out.append(line)
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN!r} without an {END!r} after it")
    text = "".join(out)
    return (text[:-1] if text.endswith("\n") and not source.endswith("\n") else text), regions


def nbgrader(grade_id, solution):
    """nbgrader's cell metadata (schema 3): a solution cell, or a locked cell (solution=False)."""
    return {"grade": False, "grade_id": grade_id, "locked": not solution, "schema_version": 3,
            "solution": solution, "task": False}


def student_copy(nb, name="notebook"):
    """A new notebook: solutions replaced (code cells), outputs and execution counts cleared,
    nbgrader's metadata on each solution cell (`exercise-K`) and its checker (`exercise-K-check`).
    A marker line in a Markdown cell is an error (prose may name the markers, inline)."""
    import copy
    nb = copy.deepcopy(nb)
    solutions = []
    for i, cell in enumerate(nb.cells):
        where = f"{name}, cell {i}"
        if cell.cell_type == "code":
            cell.source, regions = strip_solutions(cell.source, where)
            cell.outputs, cell.execution_count = [], None
            if regions:
                solutions.append(i)
        elif any(line.strip() in (BEGIN, END) for line in cell.source.splitlines()):
            raise ValueError(f"{where}: a solution marker line in a {cell.cell_type} cell")
    clean(nb)
    for k, i in enumerate(solutions, 1):
        nb.cells[i].metadata["nbgrader"] = nbgrader(f"exercise-{k}", solution=True)
        check = next((j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"), None)
        if check is not None and check not in solutions:
            nb.cells[check].metadata["nbgrader"] = nbgrader(f"exercise-{k}-check", solution=False)
    return nb


def nbgrader_misreads(nb):
    """[(cell index, line)]: the lines nbgrader would take for a marker and are none of ours.
    nbgrader reads any line *holding* 'BEGIN SOLUTION' or 'END SOLUTION', in any cell, as a
    marker: prose that writes the markers out on a line makes `nbgrader generate_assignment` fail."""
    return [(i, line.strip()) for i, cell in enumerate(nb.cells) for line in cell.source.splitlines()
            if ("BEGIN SOLUTION" in line or "END SOLUTION" in line)
            and not (cell.cell_type == "code" and line.strip() in (BEGIN, END))]


def write_student_copies(out_dir, notebooks=NOTEBOOKS):
    """Write the student copy of every notebooks/*.ipynb into out_dir -> the paths written."""
    import nbformat
    out_dir, notebooks = Path(out_dir), Path(notebooks)
    if out_dir.resolve() == notebooks.resolve() or notebooks.resolve() in out_dir.resolve().parents:
        raise ValueError(f"OUT_DIR must lie outside {notebooks.name}/ (it holds the solutions), "
                         f"got {out_dir}")
    sources = sorted(notebooks.glob("*.ipynb"))
    if not sources:
        raise ValueError(f"no notebook in {notebooks}")
    copies = [(path.name, student_copy(nbformat.read(path, as_version=4), path.name)) for path in sources]
    out_dir.mkdir(parents=True, exist_ok=True)  # only once every copy is made: no half-written OUT_DIR
    written = []
    for name, nb in copies:
        nbformat.validate(nb)
        nbformat.write(nb, out_dir / name)
        written.append(out_dir / name)
    return written


# ----------------------------------------------------------------------------- clean outputs


def clean(nb):
    """In place and returned: execution counts null (cells and results), notebook metadata the
    kernel only, cell metadata their tags only (nbval reads them), outputs' metadata kept, the
    pieces of one stream joined (how a print is split into messages depends on timing), and
    the states of a progress bar that a carriage return overwrote dropped."""
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags")
        cell.metadata = {"tags": list(tags)} if tags else {}
        if cell.cell_type == "code":
            cell.execution_count = None
            outputs = []
            for output in cell.outputs:
                if "execution_count" in output:
                    output.execution_count = None
                previous = outputs[-1] if outputs else None
                if (output.output_type == "stream" and previous is not None
                        and previous.output_type == "stream" and previous.name == output.name):
                    previous.text += output.text
                else:
                    outputs.append(output)
            for output in outputs:
                if output.output_type == "stream":  # a progress bar: keep what a terminal shows
                    output.text = OVERWRITTEN.sub("", output.text)
            cell.outputs = outputs
    return nb


OVERWRITTEN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)  # text a later \r wrote over (as nbval reads it)


def _machine_strings():
    """This machine's own absolute paths, longest first: the repository, the environment, home."""
    found = {str(NOTEBOOKS.parent), sys.prefix, sys.base_prefix, sys.exec_prefix, tempfile.gettempdir(),
             str(Path.home())}
    return sorted((s for s in found if s and s not in ("/", "\\") and len(s) > 3), key=len, reverse=True)


# an absolute path under a folder that only exists on a machine (POSIX, macOS) or a drive letter
ABSOLUTE_PATH = re.compile(r"(?<![\w/.~:-])/(?:home|root|tmp|work|usr|opt|var|srv|mnt|Users|private|etc)/"
                           r"|(?<![\w\\])[A-Z]:\\\w[^\\\s]*\\")


def _output_texts(output):
    """Every text an output shows: streams, text/* and JSON data, an error's value and traceback."""
    if output.get("output_type") == "stream":
        yield output.get("text", "")
    elif output.get("output_type") == "error":
        yield output.get("evalue", "")
        yield "\n".join(output.get("traceback", []))
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            yield value if isinstance(value, str) else "".join(value) if isinstance(value, list) else str(value)


def absolute_paths(nb):
    """[(cell index, the offending text)] for every output holding an absolute path, and every
    source holding one of this machine's own paths."""
    machine = _machine_strings()
    found = []
    for i, cell in enumerate(nb.cells):
        for s in machine:
            if s in cell.source:
                found.append((i, s))
        for output in cell.get("outputs", []):
            for text in _output_texts(output):
                hits = [s for s in machine if s in text]
                hits += [text[max(m.start() - 20, 0):m.end() + 30] for m in ABSOLUTE_PATH.finditer(text)]
                found += [(i, hit.strip()) for hit in hits]
    return found


def execute(path, timeout=600):
    """Run the notebook at path top to bottom in a fresh python3 kernel started in its folder
    -> the executed notebook (not written). Raises nbclient's CellExecutionError on a failing cell."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(Path(path).resolve().parent)}})
    client.execute()
    return nb


def run_notebooks(paths, timeout=600, log=print, run=True):
    """Execute (unless run=False) and clean each notebook in place -> the number that failed
    (not written)."""
    import nbformat
    from nbclient.exceptions import CellExecutionError
    failed = 0
    for path in map(Path, paths):
        start = time.perf_counter()
        try:
            nb = clean(execute(path, timeout) if run else nbformat.read(path, as_version=4))
        except CellExecutionError as e:
            log(f"FAIL {path.name}: a cell raised, notebook not written\n{e}")
            failed += 1
            continue
        found = absolute_paths(nb)
        if found:
            log(f"FAIL {path.name}: absolute paths of this machine in the outputs, notebook not written:")
            for i, text in found:
                log(f"  cell {i}: {text!r}")
            failed += 1
            continue
        nbformat.validate(nb)
        nbformat.write(nb, path)
        log(f"ran {path.name} in {time.perf_counter() - start:.1f} s, cleaned and written" if run
            else f"cleaned {path.name} (not executed) and written")
    return failed


# ----------------------------------------------------------------------------- the command


def main(argv=None):
    parser = cli.parser("course", "The notebooks of the course (notebooks/): make the student copies, "
                                  "execute and clean the notebooks before committing them, or build the site.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{student,run,site}")
    student = sub.add_parser(
        "student", help="write the student copies: solutions replaced by raise NotImplementedError",
        description=f"Write a copy of every notebook into OUT_DIR with what lies between "
                    f"'{BEGIN}' and '{END}' replaced by 'raise NotImplementedError' (the markers "
                    f"kept, the cells marked for nbgrader) and all outputs cleared. notebooks/ "
                    f"itself is only read.")
    student.add_argument("out_dir", metavar="OUT_DIR", help="where to write the copies (not notebooks/)")
    run = sub.add_parser(
        "run", help="execute notebooks in place, then clean them for committing",
        description="Execute each notebook top to bottom in a fresh kernel started in its folder, "
                    "then clear execution counts and metadata and write it back. A notebook whose "
                    "cell fails, or whose outputs hold an absolute path, is not written; exit 1.")
    run.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                     help="notebooks to run (default: every notebooks/*.ipynb)")
    run.add_argument("--timeout", type=float, default=600, help="seconds per cell (default 600)")
    run.add_argument("--no-execute", action="store_true",
                     help="only clean (counts, metadata, streams) and check for paths: outputs kept as they are")
    from . import coursesite
    coursesite.add_parser(sub)
    args = parser.parse_args(argv)

    if args.action == "site":
        return coursesite.run(args)
    if args.action == "student":
        try:
            written = write_student_copies(args.out_dir)
        except ValueError as e:
            raise cli.UsageError(str(e)) from e
        import nbformat
        for path in written:
            print(f"wrote {cli.shown(path)}")
            for i, line in nbgrader_misreads(nbformat.read(path, as_version=4)):
                print(f"  note: nbgrader takes this line of cell {i} for a marker (its generate_assignment "
                      f"fails): {line[:50]!r}...")
        return 0
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [p for p in map(Path, paths) if not p.is_file()]
    if missing or not paths:
        raise cli.UsageError(f"NOTEBOOK: expected existing notebooks, got no such file: "
                             f"{', '.join(map(str, missing)) or NOTEBOOKS}")
    return 1 if run_notebooks(paths, args.timeout, run=not args.no_execute) else 0
