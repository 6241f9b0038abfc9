"""Where the commands write, and how: shipped work protected, outputs checked before any work,
every file written atomically.

    SCRATCH                          the default output folder: <temp dir>/minitransformer-out/
    check_output(path, arg, ...)     refuse an output that would destroy something (UsageError)
    check_output_dir(folder, ...)    the same for a folder of outputs (the figures)
    atomic_write(path, write)        temporary file in the same folder -> fsync -> os.replace
    write_section(path, name, body)  replace a README's generated section, between its markers

Shipped work is the package folder (minitransformer/, whose assets/base.npz is the shipped
base), the repository's figures/ and its README.md. A command writes there only when its output
argument names the place *and* --overwrite is given; by default every command writes to SCRATCH
and says so.

Leftovers: a file being written is named `.<target name>.<random>.minitransformer-tmp`. A save
that is killed mid-write (kill -9, power loss) leaves one behind, never a half-written target;
the next save into the same folder removes those older than STALE_SECONDS (a younger one may
belong to a save that is still running).
"""
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

from .cli import UsageError, shown

PACKAGE = Path(__file__).resolve().parent.parent  # minitransformer/
ROOT = PACKAGE.parent  # the repository, in a checkout
ASSETS = PACKAGE / "assets"
FIGURES = ROOT / "figures"
README = ROOT / "README.md"
SHIPPED = {PACKAGE: "the package folder", FIGURES: "the repository's figures/",
           README: "the repository's README.md"}
# not <temp dir>/minitransformer: a folder named like the package would shadow it for Python
# run from the temp dir (an empty folder on sys.path is taken for a namespace package)
SCRATCH = Path(tempfile.gettempdir()) / "minitransformer-out"
TMP_SUFFIX = ".minitransformer-tmp"
STALE_SECONDS = 600


# ----------------------------------------------------------------------------- checks before the work


def shipped(path):
    """Which shipped work `path` is part of (a description), or None."""
    p = Path(path).resolve()
    for place, what in SHIPPED.items():
        if p == place or place in p.parents:
            return what
    return None


def _writable_folder(folder, arg):
    """Refuse a folder that cannot be created or written into; writes nothing that stays."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:  # the save creates the rest
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{arg}: {shown(existing)} is a file, expected a folder to write into")
    try:  # os.access says yes to root everywhere; only a real file says yes for sure
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{arg}: cannot write in {shown(existing)} ({e.strerror or e})") from e


def _refuse_shipped(path, arg, overwrite):
    """Shipped work is written only with --overwrite (overwrite=None: the command has no such
    option, so never)."""
    what = shipped(path)
    if what and not overwrite:
        hint = ", written only with --overwrite" if overwrite is not None else ""
        raise UsageError(f"{arg}: {shown(path)} is shipped work ({what}){hint}; expected another path")


def check_output(path, arg, same_kind, kind, overwrite=False, inputs=None):
    """-> Path(path), after refusing (UsageError; nothing is written) an output given as `arg`
    that is one of the command's input files (`inputs`: {argument: path}), a folder, shipped
    work without `overwrite` (None: never), an existing file for which same_kind(path) is False
    (`kind` names what was expected), or in a place that cannot be written."""
    path = Path(path)
    for other_arg, other in (inputs or {}).items():
        if other is not None and path.resolve() == Path(other).resolve():
            raise UsageError(f"{arg}: {shown(path)} is the file {other_arg} reads; expected another path")
    if path.is_dir():
        raise UsageError(f"{arg}: {shown(path)} is a folder, expected a file path such as "
                         f"{shown(path / 'name')}")
    _refuse_shipped(path, arg, overwrite)
    if path.exists() and not same_kind(path):
        raise UsageError(f"{arg}: {shown(path)} exists and is not {kind}; refusing to replace it "
                         "(expected a new path or a file of that kind)")
    _writable_folder(path.parent, arg)
    return path


def check_output_dir(folder, arg, outputs, overwrite=False):
    """-> Path(folder), after check_output on every file the command writes into it
    (`outputs`: {file name: (same_kind, kind)}) and refusing a folder that is a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{arg}: {shown(folder)} is a file, expected a folder")
    _refuse_shipped(folder, arg, overwrite)
    for name, (same_kind, kind) in outputs.items():
        check_output(folder / name, arg, same_kind, kind, overwrite)
    return folder


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def json_with(*keys):
    """-> a same_kind test: is the file a JSON object holding every one of `keys`?"""
    def test(path):
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return test


# ----------------------------------------------------------------------------- atomic writes


def remove_stale(folder):
    """Remove the temporary files of killed saves (older than STALE_SECONDS) from `folder`."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") and e.name.endswith(TMP_SUFFIX) and e.is_file() \
                    and time.time() - e.stat().st_mtime > STALE_SECONDS:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def atomic_write(path, write):
    """Write `path` by calling write(f) on a binary file: a temporary file in the same folder,
    flushed to disk, then renamed over `path` in one step (os.replace), so a crash leaves the
    previous file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); give it a normal file's mode
        os.replace(tmp, path)  # atomic on POSIX and Windows: the old file or the new, never half
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # the rename itself reaches the disk with the folder's entry
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_text(path, text):
    """atomic_write of a text file (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- generated README sections


def markers(name):
    """The two lines around a generated section: '<!-- name:start ...' and '<!-- name:end -->'."""
    return f"<!-- {name}:start", f"<!-- {name}:end -->"


def section_bounds(text, name, path):
    """-> (start, end) of the text between section `name`'s markers; ValueError if missing."""
    start_mark, end_mark = markers(name)
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < start:
        raise ValueError(f"{shown(path)}: expected the markers {start_mark!r} ... {end_mark!r}, "
                         "got none (or in the wrong order)")
    return text.index("\n", start) + 1, end  # the start marker's own line stays as it is


def has_section(name):
    """-> a same_kind test for check_output: does the file hold section `name`'s markers?"""
    def test(path):
        try:
            section_bounds(Path(path).read_text(), name, path)
        except (OSError, ValueError):
            return False
        return True
    return test


def write_section(path, name, body):
    """Replace the text between section `name`'s markers of the file at `path` by `body`,
    atomically; nothing else in the file changes."""
    text = Path(path).read_text()
    start, end = section_bounds(text, name, path)
    write_text(path, text[:start] + body.rstrip("\n") + "\n" + text[end:])
