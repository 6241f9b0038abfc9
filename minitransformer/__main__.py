"""The command line: python -m minitransformer [demo|gradcheck|pretrain|figures|bench] ...

Every command writes to a scratch folder unless told otherwise, refuses a bad argument before any
work, and reports any error in one line (tools/cli.py, docs/errors.md).
"""
import sys

if __name__ == "__main__":  # python -m minitransformer, still loading: a signal now ends it in one line
    import os
    import signal

    def _starting(signum, frame):
        print(f"minitransformer: error: interrupted while starting ({signal.Signals(signum).name})",
              file=sys.stderr, flush=True)
        # Exit at once: an exception raised here could land inside an extension's import (NumPy's
        # import of datetime turns it into an ImportError with a traceback). Nothing is written yet.
        os._exit(128 + signum)  # the commands' own handlers replace this one once they start

    for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, _name):
            signal.signal(getattr(signal, _name), _starting)

import importlib  # noqa: E402
import os  # noqa: E402

from .tools import runtime  # noqa: E402  first: it sets how NumPy's BLAS runs, before NumPy loads
from . import backend  # noqa: E402
from .tools import cli  # noqa: E402

COMMANDS = {
    "demo": "load the shipped base, train one task's adapter, prove the base unchanged (default)",
    "gradcheck": "check every backward pass against finite differences (float64)",
    "pretrain": "pretrain a base checkpoint, deterministically (the shipped one: --overwrite)",
    "figures": "re-create the paper's figures (add --quick for tiny sizes)",
    "bench": "the performance benchmark (add --json PATH, --quick)",
    "course": "the notebooks: `course student OUT_DIR` (student copies), `course run` (execute, clean), "
              "`course site OUT_DIR` (HTML pages)",
}


MODULES = {"demo": ".tools.demo", "gradcheck": ".tools.gradcheck_command", "pretrain": ".tools.pretrain",
           "figures": ".tools.experiments", "bench": ".tools.bench", "course": ".tools.course"}
FAST = ("demo", "pretrain", "figures")  # the commands that train at size; bench measures both paths


def command(name):
    """The main(argv) of command `name`, imported only when it runs: figures needs matplotlib,
    the others do not, and a missing package is reported in one line like any error."""
    return importlib.import_module(MODULES[name], __package__).main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print("usage: python -m minitransformer [command] [options]   (each command takes --help)\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0
    if os.environ.get("MINITRANSFORMER_KEEP_MEMORY", "1") != "0":
        runtime.keep_freed_memory()  # fewer page faults in every step (see runtime.py)
    name = argv[0] if argv and not argv[0].startswith("-") else "demo"
    rest = argv[1:] if argv and argv[0] == name else argv
    if name not in COMMANDS:
        return cli.fail("", f"command: expected one of {', '.join(COMMANDS)}, got {name!r} "
                            "(python -m minitransformer --help lists them)", 2)
    if name in FAST:
        backend.use("fast")  # training at size: the fast kernels (backend.py, tools/kernels.py)
    return cli.run(name, lambda args: checked_environment() or command(name)(args), rest)


SWITCHES = ("MINITRANSFORMER_DEBUG", "MINITRANSFORMER_KEEP_MEMORY")  # each "0" or "1" when set


def checked_environment():
    """Refuse a bad MINITRANSFORMER_* variable before any work (exit 2), not at the first step:
    THREADS an integer from 1 to runtime.MAX_THREADS, the switches 0 or 1."""
    for name in SWITCHES:
        if os.environ.get(name, "0") not in ("", "0", "1"):
            raise cli.UsageError(f"{name}: expected 0 or 1, got {os.environ[name]!r}")
    try:
        runtime.threads()
    except ValueError as e:
        raise cli.UsageError(str(e)) from e


if __name__ == "__main__":
    sys.exit(main())
