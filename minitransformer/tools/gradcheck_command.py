"""python -m minitransformer gradcheck: every backward pass against centred finite differences,
in float64, on the reference path, the fast one, or both (the checks are gradcheck.py's)."""
import time

from .. import backend
from ..gradcheck import MODEL_THRESHOLD, OP_THRESHOLD, check_all
from . import cli  # the commands' parser: one-line errors, --debug


def main(argv=None):
    """python -m minitransformer gradcheck: every operation, then every parameter of every model."""
    parser = cli.parser("gradcheck", "Check every backward pass against centred finite differences "
                                     "in float64; exit 0 only if every check passes.")
    parser.add_argument("--path", choices=(*backend.PATHS, "both"), default="reference",
                        help="which code to check: the reference passes (default), the fast kernels, or both")
    args = parser.parse_args(argv)
    paths = backend.PATHS if args.path == "both" else (args.path,)
    start, worst, failed = time.time(), 0.0, []
    for path in paths:
        print(f"Gradient checks of the {path} path, float64, centred differences (h=1e-5). "
              f"Thresholds: {OP_THRESHOLD:.0e} per operation, {MODEL_THRESHOLD:.0e} per model.\n")
        with backend.using(path):
            w, f = check_all()
        print(f"\n{path} path: {len(f)} check(s) failed; max relative error {w:.2e}\n")
        worst, failed = max(worst, w), failed + [f"{path}: {x}" for x in f]
    print(f"{len(failed)} check(s) failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{time.time() - start:.1f} s")
    print(f"max relative error: {worst:.2e}")
    return 1 if failed else 0
