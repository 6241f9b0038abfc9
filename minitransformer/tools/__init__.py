"""The tools floor: everything around the textbook that trains, measures, saves and shows it.

    data.py         the synthetic language: pretraining corpus and four downstream tasks
    train.py        the training loop and the methods it compares (adapter, head, full, ...)
    pretrain.py     masked-token pretraining of the shipped base (assets/base.npz)
    checkpoint.py   save/load of the base and of single adapters (.npz, validated, atomic)
    demo.py         the main job: python -m minitransformer
    experiments.py  the paper's experiments; plots.py draws their figures and README section
    bench.py        the performance benchmark
    runtime.py      how the process runs: threads, BLAS, memory
    cli.py          what every command shares: one-line errors, exit codes 2 and 1, --debug
    files.py        where commands write: shipped work protected, outputs checked, atomic writes
    schema.py       what a JSON file the commands read must hold, checked field by field
    fast.py         installs kernels.py and kernels_attention.py as backend's path "fast"

Nothing here is needed to follow the maths: that is the floor above (layers.py, attention.py,
adapters.py, losses.py, optim.py, modules.py, model.py, sizes.py, validate.py, gradcheck.py).
"""
from . import runtime  # noqa: E402,F401  first: it sets how NumPy's BLAS runs, before NumPy loads
from . import fast  # noqa: E402,F401  installs the fast kernels as backend's path "fast"
