"""How `python -m pytest` checks the notebooks (nbval, switched on in pyproject.toml).

Two settings nbval does not have:

1. Every cell's outputs are compared, although the committed notebooks carry no execution
   counts. nbval treats a cell whose execution_count is null as never run: it would compare
   nothing there, and fail a null-count cell that has outputs ("Unrun reference cell has
   outputs"). Our notebooks are committed executed, then cleaned of their counts (`python -m
   minitransformer course run --overwrite`), so every code cell counts as run: a cell that newly prints,
   prints something else, or stops printing fails the test.
2. The sanitize file named in addopts (notebooks/nbval_sanitize.cfg) is found from the
   repository root, whatever folder pytest was started from.

What is compared: text outputs exactly (after the sanitize file's regexes mask what may vary:
timings, memory addresses, progress bars, measured round-off); images only by their presence
and their text (nbval skips image/png: a PNG's bytes differ across machines and library
versions). A cell tagged `nbval-ignore-output` runs but is not compared; `raises-exception`
lets a cell raise on purpose.
"""
from pathlib import Path


def pytest_configure(config):
    sanitize = getattr(config.option, "nbval_sanitize_with", None)
    if sanitize and not Path(sanitize).is_absolute() and not Path(sanitize).exists():
        config.option.nbval_sanitize_with = str(config.rootpath / sanitize)


def pytest_collection_modifyitems(items):
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: no notebook is collected either
        return
    for item in items:
        if isinstance(item, IPyNbCell) and item.cell.execution_count is None:
            item.cell.execution_count = item.cell_num + 1  # committed executed: compare it
