"""What every command shares: a parser whose errors are one line, and one way to report errors.

    p = cli.parser("demo", "what the command does")   # argparse, plus --debug
    code = cli.run("demo", main, argv)                  # main(argv) -> exit code

Every error a user can cause reaches them as one line on stderr, never a traceback:

    minitransformer <command>: error: <what, which argument, what was expected>

Exit code 2: a bad argument, found before any work (UsageError, argparse's own errors).
Exit code 1: a failure during the work (a bad file, a full disk, too little memory, a loss
that became NaN, a missing optional package). --debug, or MINITRANSFORMER_DEBUG=1 in the
environment, prints the traceback as well.
Exit code 128+N: stopped by signal N, handled like Ctrl-C (130): SIGTERM 143, SIGHUP 129. The
signal becomes an exception, so every file being written removes its temporary file on the way out.
"""
import argparse
import os
import signal
import sys
import threading
import traceback

# errors a user's input or machine can cause: one line each (CheckpointError and the configs'
# checks are ValueErrors, bad JSON is json.JSONDecodeError, a diverged loss is an ArithmeticError)
FAILURES = (ValueError, TypeError, KeyError, OSError, MemoryError, ArithmeticError, ImportError)


class UsageError(ValueError):
    """A bad command-line argument, found before any work: exit code 2."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program was, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def handle_signals():
    """Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP raise Stopped (main thread only)
    -> the handlers they replace, {signal: handler}, for restore_signals."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    before = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            before[getattr(signal, name)] = signal.signal(getattr(signal, name), _stop)
    return before


def restore_signals(before):
    for signum, handler in before.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def check_int(text, arg, low, high):
    """int(text) within [low, high], for a flag or an environment variable `arg`; UsageError
    (naming `arg` and the range) for anything else: '1.5', '²' (a digit, but not 0-9), 10**6."""
    text = str(text).strip()
    if not (text.isascii() and text.lstrip("+-").isdigit()):
        raise UsageError(f"{arg}: expected an integer from {low} to {high}, got {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise UsageError(f"{arg}: expected an integer from {low} to {high}, got {value}")
    return value


def int_in(arg, low, high):
    """An argparse type: an integer in [low, high] (check_int)."""
    def parse(text):
        try:
            return check_int(text, arg, low, high)
        except UsageError as e:  # argparse shows an ArgumentTypeError's own text
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{arg}: ")) from e
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit: one line instead
        raise UsageError(message)


def parser(command, description):
    """An argparse parser for `python -m minitransformer <command>`, with --debug."""
    p = _Parser(prog=f"python -m minitransformer {command}", description=description)
    p.add_argument("--debug", action="store_true",
                   help="on an error, also print the traceback (or set MINITRANSFORMER_DEBUG=1)")
    return p


def shown(path):
    """`path` as printed: relative to the working directory when inside it (no machine's own
    folders in the output), else absolute (a temporary folder, say)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # on another drive (Windows)
        return os.path.abspath(path)
    return os.path.abspath(path) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def message(e):
    """The one line that describes exception `e`."""
    if isinstance(e, ModuleNotFoundError):
        return (f"needs the Python package {e.name!r}, which is not installed "
                f"(pip install {e.name}, or pip install -r requirements.txt)")
    if isinstance(e, OSError) and e.filename is not None:
        return f"{shown(e.filename)}: {e.strerror or e}"
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + str(e) if str(e) else ''} (try smaller sizes)"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if not isinstance(e, FAILURES):  # a bug, not a user's mistake: say what it was
        text = f"unexpected {type(e).__name__}: {text} (a bug; --debug shows where)"
    return " ".join(text.split()) or type(e).__name__


def fail(command, text, code):
    """Print the one error line of `command` to stderr -> code."""
    name = f"minitransformer {command}" if command else "minitransformer"
    print(f"{name}: error: {text}", file=sys.stderr)
    return code


def run(command, main, argv):
    """main(argv) -> its exit code; any error becomes one line (2: bad argument, 1: failure)."""
    debug = "--debug" in argv or os.environ.get("MINITRANSFORMER_DEBUG", "0") not in ("", "0")
    before = {}
    try:
        before = handle_signals()  # put back on return: a caller in Python keeps its own handlers
        return main(argv)
    except SystemExit as e:  # --help (0), or a command that exits on its own
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        if before:  # a second one while we print is ignored, not a traceback
            signal.signal(signum, signal.SIG_IGN)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"minitransformer {command}: {how} (files are replaced in one step: none is "
              "half-written, temporary files removed)", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # noqa: BLE001  every error ends here, as one line
        if debug:
            traceback.print_exc()
        return fail(command, message(e), 2 if isinstance(e, UsageError) else 1)
    finally:
        restore_signals(before)
