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
yet". The notebooks in notebooks/ are only read; OUT_DIR may not be shipped work (notebooks/,
figures/, the package...), and a notebook already in OUT_DIR that differs from its fresh copy
(a student's own work) is replaced only with --overwrite. The copies are moved in as one set.

`course run` executes each notebook top to bottom from its own folder (as nbval does), then
cleans it for committing: every execution count null, notebook metadata reduced to the kernel,
cell metadata to their tags (`--no-execute`: clean only). It refuses to write a notebook whose
outputs hold an absolute path of this machine (a path would make the outputs differ on every
other machine, and leak). It writes each notebook back over itself, so it needs --overwrite.

Every notebook is read as a regular file of at most files.READ_LIMIT bytes, checked against the
notebook schema (a bad one is refused naming the file), and written atomically (files.write_text).
"""
import contextlib
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import cli, files

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


def read_notebook(path, arg="NOTEBOOK"):
    """The notebook at `path` (nbformat 4), read as a bounded regular file and validated against
    the notebook schema; ValueError naming the file and what is wrong otherwise."""
    import nbformat
    data = files.read_bytes(path, arg)
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        nbformat.validate(nb)
    except (ValueError, RecursionError, nbformat.ValidationError) as e:  # bad UTF-8, JSON, schema
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{arg}: {cli.shown(path)} is not a valid notebook ({first[:200]})") from e
    except Exception as e:  # noqa: BLE001  nbformat's converters raise whatever a bad field makes them
        raise ValueError(f"{arg}: {cli.shown(path)} is not a valid notebook ({type(e).__name__}: "
                         f"{str(e)[:200]})") from e
    return nb


def notebook_text(nb):
    """The text nbformat.write would write (validated first)."""
    import nbformat
    nbformat.validate(nb)
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write_student_copies(out_dir, notebooks=NOTEBOOKS, overwrite=False):
    """Write the student copy of every notebooks/*.ipynb into out_dir -> the paths written.
    Refused (cli.UsageError, nothing written): OUT_DIR in shipped work or in `notebooks`, and,
    unless `overwrite`, an OUT_DIR holding a notebook that differs from the copy about to be
    written there (someone's own work)."""
    out_dir, notebooks = Path(out_dir), Path(notebooks)
    files.check_output_dir(out_dir, "OUT_DIR", {}, overwrite=True)  # empty, a file, a FIFO, a loop
    if out_dir.resolve() == notebooks.resolve() or notebooks.resolve() in out_dir.resolve().parents:
        raise cli.UsageError(f"OUT_DIR: expected a folder outside {notebooks.name}/ (it holds the "
                             f"solutions), got {cli.shown(out_dir)}")
    if files.shipped(out_dir):
        raise cli.UsageError(f"OUT_DIR: {cli.shown(out_dir)} is shipped work ({files.shipped(out_dir)}), "
                             "never written by this command; expected another folder")
    sources = sorted(notebooks.glob("*.ipynb"))
    if not sources:
        raise ValueError(f"no notebook in {cli.shown(notebooks)}")
    texts = {path.name: notebook_text(student_copy(read_notebook(path), path.name)) for path in sources}
    for name, text in texts.items():
        files.check_output(out_dir / name, "OUT_DIR", lambda p: True, "a notebook", overwrite=None)
    if not overwrite and out_dir.is_dir():
        for path in sorted(out_dir.glob("*.ipynb")):
            mine = texts.get(path.name)
            if files.kind(path) != "file" or mine is None or files.read_bytes(path, "OUT_DIR") != mine.encode():
                raise cli.UsageError(f"OUT_DIR: {cli.shown(out_dir)} holds {path.name}, which is not "
                                     "the copy this command writes (someone's own work?); refusing to "
                                     "replace it: expected a new or empty folder, or --overwrite")
    with files.written_together(out_dir) as stage:  # every copy, or none
        for name, text in texts.items():
            files.write_text(stage / name, text)
    return [out_dir / name for name in texts]


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
    -> the executed notebook (not written). Raises nbclient's CellExecutionError on a failing cell;
    KeyboardInterrupt (cli.Stopped for SIGTERM, SIGHUP), and nothing else, when a signal came."""
    import asyncio
    import subprocess
    from nbclient import NotebookClient
    nb = read_notebook(path)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(Path(path).resolve().parent)}})
    came = []  # nbclient catches SIGINT and SIGTERM on its event loop and shuts the kernel down,
    #            so the cell then fails as "kernel died": note the signal, to report it instead
    loop = asyncio.new_event_loop()
    add_handler = loop.add_signal_handler
    loop.add_signal_handler = lambda sig, callback, *a: add_handler(
        sig, lambda: (came.append(sig), callback(*a)))

    def stop(signum, frame):  # the others (SIGHUP) and a signal outside nbclient's handlers
        came.append(signum)
        raise KeyboardInterrupt
    main = threading.current_thread() is threading.main_thread()  # handlers: the main thread's only
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)] if main else []
    before = {n: signal.signal(getattr(signal, n), stop) for n in names}
    try:  # the kernel's own log (its warnings, a traceback when interrupted) is not ours to print
        loop.run_until_complete(client.async_execute(stderr=subprocess.DEVNULL))
    except BaseException:
        if came:
            raise (KeyboardInterrupt() if came[0] == signal.SIGINT else cli.Stopped(came[0])) from None
        raise
    finally:
        for n, handler in before.items():
            signal.signal(getattr(signal, n), handler)
        with contextlib.suppress(BaseException):  # nbclient's pollers, left pending by an interruption
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return nb


def run_notebooks(paths, timeout=600, log=print, run=True):
    """Execute (unless run=False) and clean each notebook in place -> the number that failed
    (not written)."""
    from nbclient.exceptions import CellExecutionError
    failed = 0
    for path in map(Path, paths):
        start = time.perf_counter()
        try:
            nb = clean(execute(path, timeout) if run else read_notebook(path))
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
        files.write_text(path, notebook_text(nb))  # atomic: the old notebook or the new, never half
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
    student.add_argument("--overwrite", action="store_true",
                         help="replace notebooks in OUT_DIR that differ from the fresh copies (a student's "
                              "own work is lost)")
    run = sub.add_parser(
        "run", help="execute notebooks in place, then clean them for committing",
        description="Execute each notebook top to bottom in a fresh kernel started in its folder, "
                    "then clear execution counts and metadata and write it back. A notebook whose "
                    "cell fails, or whose outputs hold an absolute path, is not written; exit 1.")
    run.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                     help="notebooks to run (default: every notebooks/*.ipynb)")
    run.add_argument("--timeout", type=cli.int_in("--timeout", 1, 86400), default=600,
                     help="seconds per cell, an integer from 1 to 86400 (default 600)")
    run.add_argument("--overwrite", action="store_true",
                     help="required: each notebook is written back over itself")
    run.add_argument("--no-execute", action="store_true",
                     help="only clean (counts, metadata, streams) and check for paths: outputs kept as they are")
    from . import coursesite
    coursesite.add_parser(sub)
    args = parser.parse_args(argv)

    if args.action == "site":
        return coursesite.run(args)
    if args.action == "student":
        try:
            written = write_student_copies(args.out_dir, overwrite=args.overwrite)
        except ValueError as e:  # a bad notebook in notebooks/ or a refused OUT_DIR: before any write
            raise cli.UsageError(str(e)) from e
        import nbformat
        for path in written:
            print(f"wrote {cli.shown(path)}")
            for i, line in nbgrader_misreads(nbformat.read(path, as_version=4)):
                print(f"  note: nbgrader takes this line of cell {i} for a marker (its generate_assignment "
                      f"fails): {line[:50]!r}...")
        return 0
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        raise cli.UsageError(f"NOTEBOOK: expected existing notebooks, got none in {cli.shown(NOTEBOOKS)}")
    for path in paths:  # regular files, each a valid notebook, each writable back in place
        files.check_input(path, "NOTEBOOK")
        try:
            read_notebook(path)
        except ValueError as e:
            raise cli.UsageError(str(e)) from e
    if not args.overwrite:
        raise cli.UsageError(f"--overwrite: course run writes each notebook back over itself "
                             f"({cli.shown(paths[0])}...); expected --overwrite to allow it")
    for path in paths:
        files.check_output(path, "NOTEBOOK", lambda p: True, "a notebook", overwrite=True)
    return 1 if run_notebooks(paths, args.timeout, run=not args.no_execute) else 0
