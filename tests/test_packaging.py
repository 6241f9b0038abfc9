"""What `pip install .` gives: every package the code imports is declared in pyproject.toml, the
commands other than figures run without the optional matplotlib, and the shipped base is
packaged."""
import ast
import re
import subprocess
import sys
import tomllib

from minitransformer.tools import files

PYPROJECT = tomllib.loads((files.ROOT / "pyproject.toml").read_text())


def imported_modules():
    """{top-level module name: [files importing it]} over the whole package."""
    found = {}
    for path in files.PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                found.setdefault(name.split(".")[0], []).append(path.name)
    return found


def declared(requirements):
    return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_third_party_import_is_declared():
    project = PYPROJECT["project"]
    allowed = declared(project["dependencies"])
    allowed |= {d for extra in project.get("optional-dependencies", {}).values() for d in declared(extra)}
    third_party = {m for m in imported_modules() if m not in sys.stdlib_module_names and m != "minitransformer"}
    assert third_party <= allowed, third_party - allowed


def test_the_commands_but_figures_need_no_optional_package():
    required = declared(PYPROJECT["project"]["dependencies"])
    optional = {d for extra in PYPROJECT["project"]["optional-dependencies"].values() for d in declared(extra)}
    assert optional and not optional & required
    code = ("import sys; import minitransformer.__main__, minitransformer.gradcheck; "
            "from minitransformer.tools import demo, pretrain, bench; "
            f"print(sorted(m for m in {sorted(optional)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_package_and_the_shipped_base_are_packaged():
    setuptools = PYPROJECT["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(files.ROOT).parts) for p in files.PACKAGE.rglob("__init__.py")}
    assert packages == set(setuptools["packages"])
    assert "assets/*.npz" in setuptools["package-data"]["minitransformer"]
    assert list(files.ASSETS.glob("*.npz"))
