"""How the process runs the maths: elementwise work on every core, and memory kept for reuse.

NumPy runs a matrix product on every core (BLAS threads), but a ufunc such as np.tanh on
one. In a training step the elementwise work (GELU, LayerNorm, softmax, AdamW) is about a
third of the time, so it ran on half the machine. `by_rows` splits that work into one block
of rows per thread. NumPy lets go of Python's GIL inside a ufunc, so the threads really do
run at once. Only operations that treat every row on its own go through it. Their result is
then bit-for-bit the result of one thread, and tests/test_runtime.py checks that this holds.

    set_threads(1)   # everything on the calling thread, e.g. to step through in a debugger

The environment variable MINITRANSFORMER_THREADS sets the starting value (default: every
core), an integer from 1 to MAX_THREADS. A cross-row reduction, such as a bias gradient summed over every row, stays on one
thread, because splitting it would change the order of its additions.

    by_rows(kernel, *arrays)   row-by-row work: LayerNorm, GELU, softmax (layers.py)
    matmul(a, b, out)          stacks of small products: attention's heads (attention.py)
    products_by_rows(kernel, *arrays)  by_rows for a chain of such products (attention's)
    product(a, b, bias=None)   one large 2-D product, one block of the output per thread (linear)
    for_each(fn, items, size)  many independent pieces: the optimizer's parameters (optim.py)
    keep_freed_memory()        fewer page faults; the command line calls it
"""
import contextlib
import os
import sys
import threading

# After each matrix product, OpenBLAS's worker threads wait for the next one by spinning on
# a core for about 0.1 s. In that time they take the core from our own elementwise threads.
# 2^19 cycles (about 0.2 ms) still covers a short step between two products, such as an
# adapter's GELU or a bias add, so the threads need not be woken again. A long step (GELU over
# (B, T, F), a softmax) lets them sleep and gets both cores. OpenBLAS reads this variable once,
# when NumPy first loads it, so it only takes effect if minitransformer is imported before numpy
# (the package's __init__ imports this module first). A value the user has set is kept.
_BLAS_TIMEOUT_BEFORE = os.environ.get("OPENBLAS_THREAD_TIMEOUT")  # the user's, or None
_NUMPY_WAS_LOADED = "numpy" in sys.modules
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "19")


def _zen4(cpuinfo=None):
    """True on an AMD Zen 4 core (family 25 with AVX-512), as /proc/cpuinfo (or the text
    `cpuinfo`) describes the first core."""
    head = cpuinfo
    if head is None:
        try:
            with open("/proc/cpuinfo") as f:
                head = f.read(1 << 16)
        except OSError:  # not Linux
            return False
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in head.split("\n\n")[0].splitlines() if ":" in line)}
    return (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())


# OpenBLAS picks its matrix-product kernels by the instructions a CPU has, and gives an AMD Zen 4
# (which has AVX-512) those written for Intel's Skylake-X. Zen 4 runs AVX-512 as two halves, and
# there OpenBLAS's Zen (AVX2) kernels were faster: float32 products of the benchmark's shapes ran at
# 104-111 GFLOP/s on one core against 98-106, and the full step took 0.91-0.97 of PyTorch's time
# against 1.00-1.01 (three runs each; docs/performance.md). Like the idle time above, OpenBLAS
# reads this once, when NumPy loads it. When NumPy was loaded first, the kernels it has are written
# down instead, so that the worker processes a command starts (a fresh interpreter each) use the
# same ones: their results are then bit for bit the parent's. A value the user has set is kept.
_BLAS_CORE_BEFORE = os.environ.get("OPENBLAS_CORETYPE")  # the user's, or None
_BLAS_CORE_ASKED = "Zen" if _BLAS_CORE_BEFORE is None and not _NUMPY_WAS_LOADED and _zen4() else None
if _BLAS_CORE_ASKED:
    os.environ["OPENBLAS_CORETYPE"] = _BLAS_CORE_ASKED

import numpy as np  # noqa: E402  (after the environment is set)

MIN_SIZE = 1 << 18  # elements (1 MiB of float32): below this, handing work to a thread costs
# more than it saves. Waking a sleeping thread took about 0.1 ms on the benchmark's
# virtual machine. Gradient checks work on small arrays, so they stay on one thread.

MAX_THREADS = 256  # more threads than this only cost memory and hand-offs, on any machine
_threads = None  # how many threads by_rows uses (None: not decided yet, see threads())
_pool = None  # the worker threads (a list of _Worker), made on first use
_pool_pid = None  # the process that made them: a forked child must make its own
_busy = threading.Lock()  # held while the workers run one caller's jobs
_memory = "returned to the OS (glibc's default)"  # what keep_freed_memory did, in words


def threads():
    """The number of threads `by_rows` splits work into."""
    global _threads
    if _threads is None:
        env = os.environ.get("MINITRANSFORMER_THREADS", "")
        if not env:
            _threads = min(os.cpu_count() or 1, MAX_THREADS)
        elif env.isascii() and env.isdigit() and 1 <= int(env) <= MAX_THREADS:  # not '²', a digit to isdigit
            _threads = int(env)
        else:
            raise ValueError(f"MINITRANSFORMER_THREADS: expected an integer number of threads from 1 to "
                             f"{MAX_THREADS}, got {env!r}")
    return _threads


def set_threads(n):
    """Use n threads for elementwise work from now on (1: all on the calling thread)."""
    global _threads, _pool
    _threads = _check_threads(n, "n")
    if _pool is not None:
        for worker in _pool:
            worker.stop()
        _pool = None


def _check_threads(n, name):
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name}: expected an integer number of threads from 1 to {MAX_THREADS}, got {n!r}")
    return n


def _workers():
    global _pool, _pool_pid, _busy
    if _pool is None or _pool_pid != os.getpid():
        _pool = [_Worker() for _ in range(threads() - 1)]
        _pool_pid, _busy = os.getpid(), threading.Lock()
    return _pool


class _Worker:
    """A thread that runs one job at a time, handed over and back through two locks.

    A step hands work to the threads about 125 times. concurrent.futures made a Future, a queue
    entry and a condition for each: side by side in one process an empty hand-off took 75 us that
    way and 21 us with two locks."""

    def __init__(self):
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()  # held: the thread waits for it
        self._done.acquire()  # held: the caller waits for it
        self._job, self._error = None, None
        threading.Thread(target=self._run, daemon=True, name="minitransformer").start()

    def start(self, job):
        self._job = job
        self._go.release()

    def finish(self):
        """Wait until the job is done; its error, if any, is raised here."""
        self._done.acquire()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self):
        self.start(None)

    def _run(self):
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            if job is None:
                return
            try:
                job()
            except BaseException as e:  # handed to the caller, which raises it
                self._error = e
            self._done.release()


def by_rows(kernel, *arrays, row_step=1, **shared):
    """Run kernel(*blocks, **shared) on matching blocks of rows of `arrays`, in parallel.

    Every array is cut along its first axis at the same places, and all of them must have
    the same length along that axis. The kernel reads its inputs and writes its outputs
    (with out=) block by block. `shared` holds values every block needs whole, such as
    gamma or a scalar. The calling thread does the first block itself. A kernel's error
    comes back as the same exception, raised here. Arrays under MIN_SIZE elements, 1-D
    arrays and set_threads(1) run kernel(*arrays, **shared) once, on the calling thread.
    Blocks start on multiples of row_step rows (see products_by_rows).
    """
    first = arrays[0]
    k = _blocks(first, row_step)
    if k == 1:
        kernel(*arrays, **shared)
        return
    n = first.shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"arrays: expected the same first axis everywhere, got shapes "
                         f"{[a.shape for a in arrays]}")
    cuts = [n * i // k // row_step * row_step for i in range(k)] + [n]  # k blocks of about n/k rows
    _in_parallel([lambda lo=lo, hi=hi: kernel(*(a[lo:hi] for a in arrays), **shared)
                  for lo, hi in zip(cuts[:-1], cuts[1:])])


def _blocks(first, row_step=1):
    """How many blocks by_rows cuts an array into: 1 for a small or 1-D array."""
    if first.ndim < 2 or first.size < MIN_SIZE:  # a 1-D array is one row
        return 1
    return max(1, min(threads(), first.shape[0] // row_step))


def _in_parallel(jobs):
    """Run the zero-argument callables at once: the first on the calling thread, the rest on
    the workers. Returns when all are done; a job's error is raised here. A call made while
    the workers are busy (from a job, or from a second thread of the user's) runs its jobs one
    after another on the calling thread."""
    workers = _workers()
    if len(jobs) - 1 > len(workers) or not _busy.acquire(blocking=False):
        for job in jobs:
            job()
        return
    try:
        started = []
        try:
            for worker, job in zip(workers, jobs[1:]):
                worker.start(job)
                started.append(worker)
            jobs[0]()
        finally:
            errors = []
            for worker in started:  # no job may still be writing when we return, or raise
                try:
                    worker.finish()
                except BaseException as e:
                    errors.append(e)
        if errors:
            raise errors[0]
    finally:
        _busy.release()


def matmul(a, b, out):
    """np.matmul(a, b, out=out) for stacks of small matrices, such as attention's heads.

    Each thread takes one block of the stack, and BLAS runs on one core inside each thread.
    A (128 x 64) @ (64 x 128) product is too small to be worth splitting between BLAS's own
    threads: with both cores, BLAS spent more time handing each product over than computing
    it. Each product is still one whole BLAS call, so the numbers do not change.
    """
    products_by_rows(np.matmul, a, b, out)  # np.matmul(a_block, b_block, out_block)


def products_by_rows(kernel, *arrays, row_step=1, **shared):
    """by_rows for a kernel that makes BLAS products of its rows' own (attention's per-sequence
    products, softmax between them): BLAS runs on one thread inside each block, as in matmul.
    One hand-off for the whole chain, where one matmul per product would hand off each time.

    A kernel whose products take its rows as the rows of a matrix (the adapter's) passes
    row_step=ALIGN: BLAS works on panels of rows, and a block starting off a panel's edge may
    compute its rows in another order, in the last bit (float32 (303, 40) @ (40, 70) cut after
    row 151 did); on multiples of ALIGN the blocks give one call's bits, as product's do."""
    limit = _blas_limit(1) if _blocks(arrays[0], row_step) > 1 else None
    with limit or contextlib.nullcontext():
        by_rows(kernel, *arrays, row_step=row_step, **shared)


MIN_PRODUCT_FLOPS = 1 << 23  # below this a product runs as one BLAS call: cutting it costs a
# hand-off (about 0.1 ms) and a block's worth of packing, more than half of a product this small
ALIGN = 64  # block edges on multiples of 64 rows or columns: whole cache lines, whole BLAS panels


def product(a, b, out=None, bias=None, residual=None):
    """a @ b (+ bias, a row of N) (+ residual, an (M, N) array) for 2-D a (M, K) and b (K, N),
    cut into one block of the output per thread.

    BLAS's own threads hand a product over, then spin on both cores after it, where they take
    the core from the elementwise threads. Above MIN_PRODUCT_FLOPS this cuts the output into
    one block per thread instead (rows of a, or columns of b when the output is wider than it is
    tall), with edges on multiples of ALIGN, and runs each block as one BLAS call on one BLAS
    thread, on the same threads as by_rows. Every output entry is still one dot product of
    length K computed by BLAS: at these sizes the same bits as one call (tests/test_runtime.py;
    only blocks of a few thousand flops, which BLAS runs by another path, may differ in the
    last bit). The bias, then the residual, are added to each block right after its product, by
    the block's thread, while the block is still in cache: the same bits as out += bias;
    out += residual afterwards.
    """
    M, N = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((M, N), dtype=np.result_type(a, b))
    along_rows = M >= N
    n = M if along_rows else N

    def block(lo, hi):  # rows lo:hi of the output, or its columns lo:hi
        r, c = (slice(lo, hi), slice(None)) if along_rows else (slice(None), slice(lo, hi))
        np.matmul(a[r], b[:, c], out=out[r, c])
        if bias is not None:
            out[r, c] += bias[c]
        if residual is not None:
            out[r, c] += residual[r, c]

    k = min(threads(), n // ALIGN)
    limit = _blas_limit(1) if k > 1 and 2 * M * N * a.shape[1] >= MIN_PRODUCT_FLOPS else None
    if limit is None:
        block(0, n)  # one BLAS call, on BLAS's own threads
        return out
    cuts = [0] + [min(n, -(-n * i // (k * ALIGN)) * ALIGN) for i in range(1, k)] + [n]
    with limit:
        _in_parallel([lambda lo=lo, hi=hi: block(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo])
    return out


_blas = []  # threadpoolctl's handle on the BLAS NumPy uses, found on first use ([None]: none)


def _blas_controller():
    """threadpoolctl's handle on the BLAS NumPy uses, or None (threadpoolctl is not installed, or
    it finds no BLAS); found once."""
    if not _blas:
        try:
            from threadpoolctl import ThreadpoolController
            found = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except ImportError:
            found = []
        _blas.append(found[0] if found else None)
    return _blas[0]


def _blas_limit(n):
    """A context that runs BLAS on n threads, or None when the BLAS cannot be told."""
    blas = _blas_controller()
    return None if blas is None else _BlasThreads(blas, n)


def _write_down_blas_core():
    """NumPy was loaded before this module: put the kernels its OpenBLAS uses in the environment
    (for the processes this one starts), unless the variable is set already."""
    blas = _blas_controller()
    core = getattr(blas, "architecture", None) if blas is not None and blas.internal_api == "openblas" else None
    if core and "OPENBLAS_CORETYPE" not in os.environ:
        os.environ["OPENBLAS_CORETYPE"] = core


if _NUMPY_WAS_LOADED:
    _write_down_blas_core()


class _BlasThreads:
    def __init__(self, blas, n):
        self.blas, self.n = blas, n

    def __enter__(self):
        self.before = self.blas.get_num_threads()
        self.blas.set_num_threads(self.n)

    def __exit__(self, *exc):
        self.blas.set_num_threads(self.before)


def for_each(fn, items, size):
    """fn(item) for every item, the items shared out among the threads by total size(item).

    One hand-off per thread for the whole list, so it pays off for many small pieces of
    work (an optimizer step over every parameter) where by_rows per piece would not.
    fn must touch only its own item's arrays. Each item is computed exactly as on one thread.
    """
    items = list(items)
    total = sum(size(it) for it in items)
    k = min(threads(), len(items))
    if k <= 1 or total < MIN_SIZE:
        for it in items:
            fn(it)
        return
    groups, load = [[] for _ in range(k)], [0] * k
    for it in sorted(items, key=size, reverse=True):  # largest first, each to the lightest group
        j = load.index(min(load))
        groups[j].append(it)
        load[j] += size(it)

    def run(group):
        for it in group:
            fn(it)
    _in_parallel([lambda g=g: run(g) for g in groups])


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back to the OS.

    By default glibc returns large freed blocks to the OS at once (munmap, or trimming the
    top of the heap). A training step then meets its ~150 MB of activations as fresh pages
    every time, with one page fault per 4 KiB page. On a virtual machine that cost 15 % of a
    step in the benchmark. mallopt(M_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD), both set
    to 1 GiB, keep the memory in the process, as PyTorch's caching allocator or jemalloc
    would. The environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ have
    the same effect. `python -m minitransformer` calls this for every command, unless the
    environment variable MINITRANSFORMER_KEEP_MEMORY is 0.
    Returns True if it took effect, and False where there is no glibc (macOS, Windows,
    musl), which leaves the allocator as it was.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    kept = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
    if kept:
        global _memory
        _memory = "kept for reuse (glibc mallopt)"
    return kept


def memory_status():
    """What happens to freed memory in this process, in words (see keep_freed_memory)."""
    return _memory


def blas_kernels_status():
    """Which OpenBLAS kernels this process asked for, and why, in words (see _zen4)."""
    if _BLAS_CORE_BEFORE is not None:
        return f"OPENBLAS_CORETYPE={_BLAS_CORE_BEFORE} (set by the user)"
    if _NUMPY_WAS_LOADED:
        return "OpenBLAS's choice (numpy was imported before minitransformer)"
    if _BLAS_CORE_ASKED:
        return f"OPENBLAS_CORETYPE={_BLAS_CORE_ASKED} (set by minitransformer: AMD Zen 4)"
    return "OpenBLAS's choice"


def blas_timeout_status():
    """How long OpenBLAS's idle threads spin in this process (see the top of this file), in words."""
    if _BLAS_TIMEOUT_BEFORE is not None:
        return f"OPENBLAS_THREAD_TIMEOUT={_BLAS_TIMEOUT_BEFORE} (set by the user)"
    if _NUMPY_WAS_LOADED:
        return "OpenBLAS's default (numpy was imported before minitransformer)"
    return f"OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']} (set by minitransformer)"
