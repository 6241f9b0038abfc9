"""The course's infrastructure (minitransformer/tools/course.py): the student copies hold no
solution and still run, saying "not implemented yet" where an exercise is unsolved, and keep
nbgrader's markers and cell metadata so that a teacher can run nbgrader on them; the committed
notebooks are clean (no execution counts, no machine paths, minimal metadata) and each has at
least three checkable exercises; `course run` executes, cleans, and refuses machine paths.

The notebooks' outputs themselves are compared by nbval (conftest.py, pyproject.toml)."""
import importlib
import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from minitransformer.__main__ import main as cli
from minitransformer.tools import course

NOTEBOOKS = sorted(course.NOTEBOOKS.glob("*.ipynb"))
CALL = re.compile(r"(\w+)\s*\(")  # every name called in a cell


def read(path):
    return nbformat.read(path, as_version=4)


def exercises(nb):
    """[(solution cell, check cell)]: each cell holding a solution and the code cell after it."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    return [(c, code[i + 1] if i + 1 < len(code) else None) for i, c in enumerate(code) if course.BEGIN in c.source]


def test_the_course_has_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "01_gradients_by_hand.ipynb"
    assert all(re.fullmatch(r"\d\d_\w+\.ipynb", p.name) for p in NOTEBOOKS)


# ----------------------------------------------------------------------------- strip_solutions


def test_strip_solutions_keeps_the_code_around_the_markers_and_the_indentation():
    source = ("def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n"
              "    ### END SOLUTION\n\n\nanswer = 3  # kept\n### BEGIN SOLUTION\nanswer = 4\n### END SOLUTION")
    text, regions = course.strip_solutions(source)
    assert regions == 2
    assert text == ("def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    raise NotImplementedError\n"
                    "    ### END SOLUTION\n\n\nanswer = 3  # kept\n"
                    "### BEGIN SOLUTION\nraise NotImplementedError\n### END SOLUTION")
    compile(text, "<student>", "exec")  # still valid Python
    assert course.strip_solutions("x = 1\n") == ("x = 1\n", 0)


@pytest.mark.parametrize("source", ["### BEGIN SOLUTION\nx = 1\n",
                                    "x = 1\n### END SOLUTION\n",
                                    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n"])
def test_strip_solutions_refuses_unbalanced_markers(source):
    with pytest.raises(ValueError, match="SOLUTION"):
        course.strip_solutions(source, "nb, cell 3")


def test_a_marker_in_markdown_is_refused():
    nb = new_notebook(cells=[new_markdown_cell("### BEGIN SOLUTION\nthe answer\n### END SOLUTION")])
    with pytest.raises(ValueError, match="marker line in a markdown cell"):
        course.student_copy(nb)


# ----------------------------------------------------------------------------- student copies


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    before = {p: p.read_bytes() for p in NOTEBOOKS}
    out = tmp_path_factory.mktemp("student")
    written = course.write_student_copies(out)
    assert {p.read_bytes() for p in NOTEBOOKS} == set(before.values())  # notebooks/ only read
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_student_copy_holds_no_solution(student_dir, path):
    original, copy = read(path), read(student_dir / path.name)
    nbformat.validate(copy)
    assert len(copy.cells) == len(original.cells)
    replaced = 0
    for before, after in zip(original.cells, copy.cells):
        if after.cell_type != "code":  # prose may name the markers, never on a line of their own
            assert after.source == before.source
            assert not {line.strip() for line in after.source.splitlines()} & {course.BEGIN, course.END}
            continue
        assert after.outputs == [] and after.execution_count is None
        expected, regions = course.strip_solutions(before.source)
        assert after.source == expected
        replaced += regions
        lines = after.source.splitlines()
        stripped = [line.strip() for line in lines]
        assert stripped.count(course.BEGIN) == stripped.count(course.END) == regions
        for k, line in enumerate(lines):  # between the markers kept: one line that raises, indented alike
            if line.strip() == course.BEGIN:
                assert lines[k + 1:k + 3] == [line.replace(course.BEGIN, "raise NotImplementedError"),
                                              line.replace(course.BEGIN, course.END)]
        if regions:
            compile(after.source, path.name, "exec")  # the student's cell is valid Python
    assert replaced == sum(c.source.count(course.BEGIN) for c in original.cells if c.cell_type == "code") >= 3


# nbgrader's cell metadata, schema 3 (nbgrader/nbgraderformat/v3.json): the fields a cell may have
NBGRADER_FIELDS = {"schema_version", "grade", "locked", "solution", "task", "grade_id", "points", "checksum",
                   "cell_type"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_student_copy_is_marked_for_nbgrader(student_dir, path):
    """Every cell holding the markers is an nbgrader solution cell (nbgrader refuses markers in any
    other cell), the checker after it is locked, the ids are unique, and nothing else is marked."""
    copy = read(student_dir / path.name)
    marked = {i: c.metadata["nbgrader"] for i, c in enumerate(copy.cells) if "nbgrader" in c.metadata}
    solutions = [i for i, c in enumerate(copy.cells) if c.cell_type == "code" and course.BEGIN in c.source]
    checks = [next(j for j in range(i + 1, len(copy.cells)) if copy.cells[j].cell_type == "code")
              for i in solutions]
    assert sorted(marked) == sorted(solutions + checks) and len(solutions) >= 3
    for i, meta in marked.items():
        assert set(meta) <= NBGRADER_FIELDS and meta["schema_version"] == 3
        assert meta["solution"] is (i in solutions) and meta["locked"] is (i not in solutions)
        assert meta["grade"] is False and meta["task"] is False  # the checkers print; they grade no points
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", meta["grade_id"])
    assert len({m["grade_id"] for m in marked.values()}) == len(marked)


def test_lines_nbgrader_would_take_for_markers_are_found():
    nb = new_notebook(cells=[new_markdown_cell("Write it between `### BEGIN SOLUTION` and the end."),
                             new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"),
                             new_code_cell("x = 1  # END SOLUTION is above")])
    assert course.nbgrader_misreads(course.student_copy(nb)) == [
        (0, "Write it between `### BEGIN SOLUTION` and the end."), (2, "x = 1  # END SOLUTION is above")]


def test_the_student_copies_refuse_notebooks_as_out_dir(tmp_path, capsys):
    for out in (course.NOTEBOOKS, course.NOTEBOOKS / "student"):
        assert cli(["course", "student", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "outside notebooks/" in err
    assert not (course.NOTEBOOKS / "student").exists()
    assert sorted(course.NOTEBOOKS.glob("*.ipynb")) == NOTEBOOKS


def test_the_student_command_writes_every_copy(tmp_path, capsys):
    assert cli(["course", "student", str(tmp_path / "copies")]) == 0
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == [p.name for p in NOTEBOOKS]
    assert capsys.readouterr().out.count("wrote ") == len(NOTEBOOKS)


def test_the_student_copy_of_01_runs_and_says_not_implemented_yet(student_dir):
    """The whole student copy of notebook 01 runs top to bottom: every check cell prints
    "not implemented yet", no cell raises, and no later cell needed a solution."""
    nb = course.execute(student_dir / "01_gradients_by_hand.ipynb")
    pairs = exercises(read(course.NOTEBOOKS / "01_gradients_by_hand.ipynb"))
    ran = {c.id: c for c in nb.cells}
    assert len(pairs) >= 3
    for _, check in pairs:
        text = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in ran[check.id].outputs)
        assert text.startswith("not implemented yet: "), text
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", (cell.source, output.get("evalue"))
            assert "Traceback" not in output.get("text", "")


# ----------------------------------------------------------------------------- committed notebooks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_committed_notebook_is_clean(path):
    nb = read(path)
    nbformat.validate(nb)
    assert nb.metadata == {"kernelspec": course.KERNELSPEC, "language_info": {"name": "python"}}
    for cell in nb.cells:
        assert set(cell.metadata) <= {"tags"}, cell.metadata
        if cell.cell_type == "code":
            assert cell.execution_count is None
            assert all(o.get("execution_count") is None for o in cell.outputs)
    assert any(c.get("outputs") for c in nb.cells), "committed without its outputs"
    assert course.absolute_paths(nb) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_at_least_three_checked_exercises(path):
    """Each solution cell is followed by a cell calling a checker of exercises.unitNN (NN the
    notebook's number) that exists, and whose committed output is a PASS."""
    nn = path.name[:2]
    module = importlib.import_module(f"minitransformer.exercises.unit{nn}")
    nb = read(path)
    assert any(re.search(rf"exercises(\.| import ){re.escape('unit' + nn)}\b", c.source) for c in nb.cells)
    pairs = exercises(nb)
    assert len(pairs) >= 3
    checkers = {name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name))}
    for solution, check in pairs:
        assert check is not None, solution.source
        called = set(CALL.findall(check.source))
        assert called & checkers, f"the cell after a solution calls no checker of unit{nn}: {check.source!r}"
        shown = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in check.outputs)
        assert "PASS " in shown and "FAIL" not in shown and "not implemented" not in shown, \
            f"{path.name}: the committed check says {shown!r}"


# ----------------------------------------------------------------------------- course run


def tiny_notebook(*sources):
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "mine"}, "widgets": {}, "authors": ["x"]}
    nb.cells[0].metadata = {"tags": ["nbval-ignore-output"], "collapsed": True, "scrolled": False}
    return nb


def test_course_run_executes_and_cleans(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(tiny_notebook("for i in range(3):\n    print(i, flush=True)\nprint('50%', end='\\r')\nprint('100%')",
                                 "6 * 7"), path)
    assert course.run_notebooks([path], log=lambda *a: None) == 0
    nb = read(path)
    assert nb.metadata == {"kernelspec": course.KERNELSPEC, "language_info": {"name": "python"}}
    assert nb.cells[0].metadata == {"tags": ["nbval-ignore-output"]}
    assert [c.execution_count for c in nb.cells] == [None, None]
    assert [o.output_type for o in nb.cells[0].outputs] == ["stream"]  # the prints, one output
    assert nb.cells[0].outputs[0].text == "0\n1\n2\n100%\n"  # what a terminal shows after the \\r
    (result,) = nb.cells[1].outputs
    assert result.data["text/plain"] == "42" and result.execution_count is None


def test_course_run_no_execute_only_cleans(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = tiny_notebook("print('kept')")
    nb.cells[0].execution_count = 3
    nb.cells[0].outputs = [new_output("stream", name="stdout", text="kept\n")]
    nb.cells[0].metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00"}
    nbformat.write(nb, path)
    assert cli(["course", "run", "--no-execute", str(path)]) == 2  # it writes over the notebook: asked
    assert cli(["course", "run", "--no-execute", "--overwrite", str(path)]) == 0
    nb = read(path)
    assert nb.cells[0].execution_count is None and nb.cells[0].outputs[0].text == "kept\n"
    assert nb.cells[0].metadata == {"tags": ["nbval-ignore-output"]}
    assert nb.metadata == {"kernelspec": course.KERNELSPEC, "language_info": {"name": "python"}}


def test_course_run_refuses_a_machine_path_and_a_failing_cell(tmp_path):
    lines = []
    for name, source in (("path.ipynb", "import os\nprint(os.getcwd())"), ("fails.ipynb", "1 / 0")):
        nbformat.write(tiny_notebook(source), tmp_path / name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert course.run_notebooks(sorted(tmp_path.iterdir()), log=lines.append) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # neither written
    assert any("fails.ipynb: a cell raised" in line for line in lines)
    assert any("path.ipynb: absolute paths" in line for line in lines)


def test_absolute_paths_are_found_in_text_outputs_only():
    nb = new_notebook(cells=[new_code_cell("x", outputs=[
        new_output("stream", name="stdout", text="saved to /home/ann/run/adapter.npz\n"),
        new_output("display_data", data={"text/plain": "see https://github.com/home/x and a/usr/b",
                                         "image/png": "iVBOR/home/AAAA"}),
        new_output("error", ename="E", evalue="", traceback=["File C:\\Users\\ann\\x.py"]),
    ])])
    found = course.absolute_paths(nb)
    assert [i for i, _ in found] == [0, 0] and "/home/ann/run" in found[0][1] and "Users" in found[1][1]


def test_the_commands_are_documented(capsys):
    assert cli(["--help"]) == 0
    assert "course" in capsys.readouterr().out
    for argv in (["course", "--help"], ["course", "student", "--help"], ["course", "run", "--help"]):
        assert cli(argv) == 0  # help is printed and the command ends with exit code 0
    out = capsys.readouterr().out
    assert "OUT_DIR" in out and "NotImplementedError" in out and "NOTEBOOK" in out


def test_the_sanitize_file_masks_only_what_varies():
    from nbval.plugin import get_sanitize_patterns
    rules = get_sanitize_patterns((course.NOTEBOOKS / "nbval_sanitize.cfg").read_text())

    def sanitize(text):
        for regex, replace in rules:
            text = re.sub(regex, replace, text)
        return text

    varies = [("PASS linear: max relative error 1.3e-11 <= 1e-07 (dx)", "PASS linear: max relative error 2.0e-11 <= 1e-07 (dx)"),
              ("FAIL ln: dx: max relative error 6.6e-01 > 1e-07; why", "FAIL ln: dx: max relative error 6.5e-01 > 1e-07; why"),
              ("train: 100%|██████████| 300/300 [00:04<00:00, 70.10it/s, loss=1.2]",
               "train: 100%|██████████| 300/300 [00:05<00:00, 61.3it/s, loss=1.2]"),
              (" " * 59 + "\r", " " * 61 + "\r"),  # a bar closed with leave=False
              ("<function f at 0x7f3a2c1e5d30>", "<function f at 0x7f00aa1e5d31>"),
              ("one step took 12.3 ms, the run 4.51 s", "one step took 9.8 ms, the run 3.02 s")]
    for a, b in varies:
        assert a != b and sanitize(a) == sanitize(b), (a, sanitize(a))
    for verdict in ("PASS x: max relative error 1.3e-11 <= 1e-07", "FAIL x: max relative error 1.3e-11 > 1e-07"):
        assert "PASS" in sanitize(verdict) or "FAIL" in sanitize(verdict)
    assert sanitize("PASS x: relative error 1e-11 <= 1e-07") != sanitize("PASS x: relative error 1e-11 > 1e-07")
    kept = ["dW averaged: relative error 0.71, above the threshold: True", "OP_THRESHOLD = 1e-07",
            "dW[1, 2] from the backward:  -2.1618", "300 steps, 2 s per epoch", "accuracy 0.93 after 200 steps"]
    for line in kept:  # everything else is compared character for character
        assert sanitize(line) == line
