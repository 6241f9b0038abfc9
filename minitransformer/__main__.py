"""The command line: python -m minitransformer [demo|gradcheck|pretrain|figures|bench] ..."""
import os
import sys

from . import backend
from .tools import runtime

COMMANDS = {
    "demo": "load the shipped base, train one task's adapter, prove the base unchanged (default)",
    "gradcheck": "check every backward pass against finite differences (float64)",
    "pretrain": "pretrain the shipped base checkpoint, deterministically",
    "figures": "re-create the paper's figures into figures/ (add --quick for tiny sizes)",
    "bench": "the performance benchmark (add --json PATH, --quick)",
    "course": "the notebooks: `course student OUT_DIR` (student copies), `course run` (execute, clean)",
}

FAST = ("demo", "pretrain", "figures")  # the commands that train at size; bench measures both paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        argv = ["help"]
    if os.environ.get("MINITRANSFORMER_KEEP_MEMORY", "1") != "0":
        runtime.keep_freed_memory()  # fewer page faults in every step (see runtime.py)
    command = argv[0] if argv and not argv[0].startswith("-") else "demo"
    rest = argv[1:] if argv and argv[0] == command else argv
    if command in FAST:
        backend.use("fast")  # training at size: the fast kernels (backend.py, tools/kernels.py)
    if command == "gradcheck":
        from .gradcheck import main as run
    elif command == "demo":
        from .tools.demo import main as run
    elif command == "pretrain":
        from .tools.pretrain import main as run
    elif command == "figures":
        from .tools.experiments import main as run
    elif command == "bench":
        from .tools.bench import main as run
    elif command == "course":
        from .tools.course import main as run
    else:
        if command != "help":
            print(f"command: expected one of {', '.join(COMMANDS)}, got {command!r}\n")
        print("usage: python -m minitransformer [command] [options]   (each command takes --help)\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if command == "help" else 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
