"""minitransformer: a transformer and Houlsby adapters in NumPy, every backward pass by hand."""
import os

# After each matrix product, OpenBLAS's worker threads wait for the next one by spinning on
# a core for about 0.1 s. In that time they take the core from our own elementwise threads
# (runtime.py). 2^19 cycles (about 0.2 ms) still covers a short step between two products,
# such as an adapter's GELU or a bias add, so the threads need not be woken again. A long
# step (GELU over (B, T, F), a softmax) lets them sleep and gets both cores. OpenBLAS reads
# this variable once, when NumPy first loads it, so it only takes effect if minitransformer
# is imported before numpy. A value the user has set is kept.
# runtime.blas_timeout_status() says whether it took effect.
_BLAS_TIMEOUT_BEFORE = os.environ.get("OPENBLAS_THREAD_TIMEOUT")  # the user's, or None
_NUMPY_WAS_LOADED = "numpy" in __import__("sys").modules
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "19")

from .adapters import AdapterConfig  # noqa: E402  (after the environment is set)
from .model import ModelConfig, Transformer  # noqa: E402
from .modules import Parameter  # noqa: E402

__all__ = ["AdapterConfig", "ModelConfig", "Parameter", "Transformer"]
