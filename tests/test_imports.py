"""The package's import graph, read from the source: no module imports itself back through others
(a circle), and no textbook module imports anything from tools/, even inside a function: the
fast path installs itself from tools/ (tools/fast.py calls backend.install), so reading the
textbook never needs tools/."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minitransformer"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, top_level_only):
    """The package modules `path` imports (at the top of the file only, or anywhere)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            if not mod.startswith("minitransformer"):
                continue
            for alias in node.names:  # "from . import backend" names a module
                sub = f"{mod}.{alias.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("minitransformer")}
    return out - {name}


def graph(top_level_only=True):
    return {module_name(p): imports(p, top_level_only) for p in PACKAGE.rglob("*.py")}


def test_no_import_circle():
    g = graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_the_textbook_imports_nothing_from_tools():
    found = {(mod, dep) for mod, deps in graph(top_level_only=False).items()
             if not mod.startswith(("minitransformer.tools", "minitransformer.exercises"))
             and mod != "minitransformer.__main__"
             for dep in deps if dep.startswith("minitransformer.tools")}
    assert not found, found


def test_the_walk_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    """The check above can fail: a lazy import of tools/ in a textbook module is found."""
    import minitransformer
    fake = tmp_path / "minitransformer"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "tools").mkdir()
    (fake / "tools" / "__init__.py").write_text("")
    (fake / "tools" / "kernels.py").write_text("")
    (fake / "layers.py").write_text("def f():\n    from .tools import kernels\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert imports(fake / "layers.py", top_level_only=False) == {"minitransformer.tools.kernels"}
    assert imports(fake / "layers.py", top_level_only=True) == set()
    assert minitransformer  # the real package is untouched


def test_the_fast_path_is_installed_by_importing_tools():
    """Without tools/, backend.use("fast") says what to import; with it, the fast kernels run."""
    import subprocess
    import sys
    code = ("from minitransformer import backend\n"
            "try:\n    backend.use('fast')\nexcept ValueError as e:\n    print(e)\n"
            "import minitransformer.tools\nfrom minitransformer.tools import kernels\n"
            "backend.use('fast')\nprint(backend.ops.layernorm_forward is kernels.layernorm_forward)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.splitlines()
    assert "import minitransformer.tools first" in out[0], out
    assert out[1] == "True", out


def test_importing_the_package_runs_no_tools_code():
    """`import minitransformer` and the public names load no module of tools/ (process settings
    such as BLAS's are made by `python -m minitransformer`, in __main__)."""
    import subprocess
    import sys
    code = ("import sys, minitransformer; from minitransformer import Transformer, ModelConfig, AdapterConfig; "
            "m = ModelConfig(n_layers=1); Transformer(m); "
            "print(sorted(n for n in sys.modules if n.startswith('minitransformer.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]", out
