"""Where the commands write, and how: shipped work protected, outputs checked before any work,
every file written atomically.

    SCRATCH                          the default output folder: <temp dir>/minitransformer-out/
    check_output(path, arg, ...)     refuse an output that would destroy something (UsageError)
    check_output_dir(folder, ...)    the same for a folder of outputs (the figures)
    check_input(path, arg)           refuse an input that is not a regular file (a FIFO, a device)
    read_bytes(path, arg, limit)     read an input file, at most `limit` bytes, never blocking
    atomic_write(path, write)        temporary file in the same folder -> fsync -> os.replace
    written_together(folder)         a set of files drawn in a staging folder, moved in as one
    write_section(path, name, body)  replace a README's generated section, between its markers

Shipped work is the package folder (minitransformer/, whose assets/base.npz is the shipped
base), the repository's figures/, notebooks/, docs/ and its README.md. A command writes there only when its output
argument names the place *and* --overwrite is given; by default every command writes to SCRATCH
and says so.

Leftovers: a file being written is named `.<target name>.<random>.minitransformer-tmp`. A save
that is killed mid-write (kill -9, power loss) leaves one behind, never a half-written target;
the next save into the same folder removes those older than STALE_SECONDS (a younger one may
belong to a save that is still running).
"""
import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

from .cli import UsageError, shown

PACKAGE = Path(__file__).resolve().parent.parent  # minitransformer/
ROOT = PACKAGE.parent  # the repository, in a checkout
ASSETS = PACKAGE / "assets"
FIGURES = ROOT / "figures"
README = ROOT / "README.md"
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
SHIPPED = {PACKAGE: "the package folder", FIGURES: "the repository's figures/",
           NOTEBOOKS: "the repository's notebooks/", DOCS: "the repository's docs/",
           README: "the repository's README.md"}
# not <temp dir>/minitransformer: a folder named like the package would shadow it for Python
# run from the temp dir (an empty folder on sys.path is taken for a namespace package)
SCRATCH = Path(tempfile.gettempdir()) / "minitransformer-out"
TMP_SUFFIX = ".minitransformer-tmp"
STALE_SECONDS = 600
TMP_EXTRA = 40  # characters a temporary name adds to its target's: "." + "." + 8 random + TMP_SUFFIX
READ_LIMIT = 64 << 20  # bytes: the largest JSON or notebook a command reads (the course's are < 1 MB)


# ----------------------------------------------------------------------------- checks before the work


def shipped(path):
    """Which shipped work `path` is part of (a description), or None."""
    p = _resolved(path)
    for place, what in SHIPPED.items():
        if p == place or place in p.parents:
            return what
    return None


def _resolved(path, arg="path"):
    """Path(path).resolve(); a symlink loop is a UsageError naming `arg`, not a crash."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11: RuntimeError("Symlink loop from ...")
        raise UsageError(f"{arg}: {shown(path)} is a symlink loop (it points back at itself); "
                         "expected a file path") from e


def kind(path):
    """What is at `path`, following symlinks: None (nothing), "file", "folder", or a description
    of anything else ("a FIFO", "a device", "a socket", "a symlink loop", "a dangling symlink")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symlink" if os.path.islink(path) else None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):  # a file in the middle of the path, a
            return None  # name too long: the callers report those, naming the argument
        raise
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def _text(path, arg):
    """Refuse an empty path (it would silently mean the default, or the working directory)."""
    if isinstance(path, str) and not path.strip():
        raise UsageError(f"{arg}: expected a path, got an empty string")


def check_input(path, arg):
    """-> Path(path), after refusing an input that is empty, missing, or not a regular file (a
    FIFO would block forever, a device such as /dev/zero never ends): UsageError."""
    _text(path, arg)
    what = kind(path)
    if what is None:
        raise UsageError(f"{arg}: {shown(path)} does not exist; expected an existing file")
    if what != "file":
        raise UsageError(f"{arg}: {shown(path)} is {'a folder' if what == 'folder' else what}; "
                         "expected a regular file")
    return Path(path)


def read_bytes(path, arg, limit=READ_LIMIT, head=None):
    """The bytes of the regular file at `path` (at most `limit`; with `head`, its first `head`
    bytes); UsageError for anything else. Opened without blocking and checked again once open,
    so a FIFO swapped in meanwhile is refused too."""
    check_input(path, arg)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UsageError(f"{arg}: cannot read {shown(path)} ({e.strerror or e})") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{arg}: {shown(path)} is not a regular file; expected one")
        data = f.read(limit + 1 if head is None else head)
    if head is None and len(data) > limit:
        raise UsageError(f"{arg}: {shown(path)} is larger than {limit >> 20} MiB; expected a smaller file")
    return data


def _writable_folder(folder, arg):
    """Refuse a folder that cannot be created or written into; writes nothing that stays."""
    existing = Path(folder)
    while kind(existing) is None and existing != existing.parent:  # the save creates the rest
        existing = existing.parent
    what = kind(existing)
    if what != "folder":
        what = "a file" if what == "file" else what
        raise UsageError(f"{arg}: {shown(existing)} is {what}, expected a folder to write into")
    try:  # os.access says yes to root everywhere; only a real file says yes for sure
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{arg}: cannot write in {shown(existing)} ({e.strerror or e})") from e


def _name_fits(path, arg, extra=TMP_EXTRA):
    """Refuse a path with a name too long for the file system: any folder's name, or the file's
    with the `extra` characters of its temporary name."""
    try:
        limit = os.pathconf(tempfile.gettempdir(), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows): the usual limit
        limit = 255
    parts = Path(path).parts
    for i, name in enumerate(parts):
        room = limit - (extra if i == len(parts) - 1 else 0)
        if len(os.fsencode(name)) > room:
            raise UsageError(f"{arg}: the name {name[:20]}... is {len(os.fsencode(name))} bytes long; "
                             f"expected at most {room}")


def _refuse_shipped(path, arg, overwrite):
    """Shipped work is written only with --overwrite (overwrite=None: the command has no such
    option, so never)."""
    what = shipped(path)
    if what and not overwrite:
        hint = ", written only with --overwrite" if overwrite is not None else ""
        raise UsageError(f"{arg}: {shown(path)} is shipped work ({what}){hint}; expected another path")


def check_output(path, arg, same_kind, kind_text, overwrite=False, inputs=None):
    """-> Path(path), after refusing (UsageError; nothing is written) an output given as `arg`
    that is an empty string or a folder path ("DIR/"), one of the command's input files
    (`inputs`: {argument: path}), a folder, a FIFO, device, socket or symlink loop, shipped work
    without `overwrite` (None: never), an existing file for which same_kind(path) is False
    (`kind_text` names what was expected), a name too long, or in a place that cannot be written."""
    _text(path, arg)
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise UsageError(f"{arg}: {path} names a folder (it ends with {path[-1]!r}), expected a file "
                         f"path such as {path}name")
    path = Path(path)
    _name_fits(path, arg)
    resolved = _resolved(path, arg)
    for other_arg, other in (inputs or {}).items():
        if other is not None and resolved == _resolved(other, other_arg):
            raise UsageError(f"{arg}: {shown(path)} is the file {other_arg} reads; expected another path")
    what = kind(path)
    if what == "folder":
        raise UsageError(f"{arg}: {shown(path)} is a folder, expected a file path such as "
                         f"{shown(path / 'name')}")
    if what not in (None, "file", "a dangling symlink"):
        raise UsageError(f"{arg}: {shown(path)} is {what}; expected a regular file or a new path")
    _refuse_shipped(path, arg, overwrite)
    if what == "file" and not same_kind(path):
        raise UsageError(f"{arg}: {shown(path)} exists and is not {kind_text}; refusing to replace it "
                         "(expected a new path or a file of that kind)")
    _writable_folder(path.parent, arg)
    return path


def check_output_dir(folder, arg, outputs, overwrite=False):
    """-> Path(folder), after check_output on every file the command writes into it
    (`outputs`: {file name: (same_kind, kind)}) and refusing a folder that is a file, a dangling
    symlink (it could not be created) or a symlink loop."""
    _text(folder, arg)
    _name_fits(folder, arg, extra=0)
    what = kind(folder)
    if what not in (None, "folder"):
        what = "a file" if what == "file" else what
        raise UsageError(f"{arg}: {shown(folder)} is {what}, expected a folder")
    folder = Path(folder)
    _resolved(folder, arg)
    _refuse_shipped(folder, arg, overwrite)
    for name, (same_kind, kind_text) in outputs.items():
        check_output(folder / name, arg, same_kind, kind_text, overwrite)
    return folder


def is_png(path):
    try:
        return read_bytes(path, "path", head=8) == b"\x89PNG\r\n\x1a\n"
    except UsageError:
        return False


def json_with(*keys):
    """-> a same_kind test: is the file a JSON object holding every one of `keys`?"""
    def test(path):
        try:
            obj = json.loads(read_bytes(path, "path"))
        except (OSError, ValueError, RecursionError):  # UsageError is a ValueError
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return test


# ----------------------------------------------------------------------------- atomic writes


def remove_stale(folder):
    """Remove the temporary files of killed saves (older than STALE_SECONDS) from `folder`."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") and e.name.endswith(TMP_SUFFIX) \
                    and time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                with contextlib.suppress(OSError):
                    if e.is_dir(follow_symlinks=False):  # a killed written_together's staging folder
                        shutil.rmtree(e.path)
                    else:
                        os.unlink(e.path)


def atomic_write(path, write):
    """Write `path` by calling write(f) on a binary file: a temporary file in the same folder,
    flushed to disk, then renamed over `path` in one step (os.replace), so a crash leaves the
    previous file or the new one, never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise _named(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); give it a normal file's mode
        os.replace(tmp, path)  # atomic on POSIX and Windows: the old file or the new, never half
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _named(e, path) from e
        raise
    sync_folder(path.parent)


def sync_folder(folder):
    """fsync a folder, so the renames in it reach the disk (POSIX; elsewhere nothing to do)."""
    if os.name == "posix":
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError as e:
            raise _named(e, folder) from e
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _named(e, path):
    """An OSError that names the file it was writing (a full disk says "No space left on device"
    without saying where): the same errno, `path` as its filename."""
    if e.filename is not None and not str(e.filename).endswith(TMP_SUFFIX):
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


# ----------------------------------------------------------------------------- a set of files


_FINAL_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_held():
    """Hold back Ctrl-C, SIGTERM and SIGHUP for the few milliseconds of a commit: a signal that
    comes meanwhile is acted on (by its usual handler) once the block is done."""
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    came, before = [], {}
    for sig in _FINAL_SIGNALS:
        before[sig] = signal.signal(sig, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for signum in came[:1]:
            handler = before[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _locked(folder):
    """An exclusive lock on `folder` itself while its set is replaced: two runs take turns, so
    each moves in a whole set. No locking where flock is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise _named(e, folder) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def written_together(folder):
    """Write a set of files that belong together (a figures folder) as one:

        with written_together(out) as stage:
            write_text(stage / "results.json", ...); draw(stage / "a.png") ...

    Everything is written into a staging folder inside `folder`; only when the block ends
    without an error are the files moved in, each by one rename, under a lock (a concurrent run
    waits) and with Ctrl-C, SIGTERM and SIGHUP held back until the last rename. An error or an
    interruption inside the block removes the staging folder and leaves `folder` as it was (a
    folder it had to create is removed again). Files of `folder` that the block does not write
    are left alone."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder)
        stage = Path(tempfile.mkdtemp(dir=folder, prefix=".set.", suffix=TMP_SUFFIX))
    except OSError as e:
        raise _named(e, folder) from e
    try:
        try:
            yield stage
        except BaseException as e:
            shutil.rmtree(stage, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty: nothing of anyone's is removed
            if isinstance(e, OSError) and e.filename is not None and Path(e.filename).parent == stage:
                # a full disk while drawing: name the file it was for, not the staging folder
                raise type(e)(e.errno, e.strerror or str(e), str(folder / Path(e.filename).name)) from e
            raise
        names = sorted(p.name for p in stage.iterdir())
        with _locked(folder), _signals_held():
            for name in names:
                try:
                    os.replace(stage / name, folder / name)
                except OSError as e:
                    raise _named(e, folder / name) from e
            sync_folder(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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


def read_text(path, arg="path"):
    """The UTF-8 text of the regular file at `path`, read with a bound (read_bytes)."""
    data = read_bytes(path, arg)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{arg}: {shown(path)} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def has_section(name):
    """-> a same_kind test for check_output: does the file hold section `name`'s markers?"""
    def test(path):
        try:
            section_bounds(read_text(path), name, path)
        except (OSError, ValueError):
            return False
        return True
    return test


def write_section(path, name, body):
    """Replace the text between section `name`'s markers of the file at `path` by `body`,
    atomically; nothing else in the file changes."""
    text = read_text(path)
    start, end = section_bounds(text, name, path)
    write_text(path, text[:start] + body.rstrip("\n") + "\n" + text[end:])
