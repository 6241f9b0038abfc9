"""Which code the model runs: the reference passes (the default) or the fast kernels.

The reference passes are the textbook: layers.py, attention.py, adapters.py, peft.py, losses.py
and optim.py, each written the way its maths is derived. The fast kernels (tools/kernels.py and
tools/kernels_attention.py) compute the same functions with in-place steps, threads and folded
constants; they take the same arguments, and tests/test_kernels.py checks each against its
reference. This module knows nothing of them: tools/fast.py installs them as the path "fast"
(install), and importing minitransformer.tools runs it.

    from minitransformer import backend
    backend.use("fast")               # from now on, in this whole process (once the tools
                                      # package was imported: it installs the path "fast")
    with backend.using("fast"): ...   # only inside the block
    backend.current()                 # "reference" or "fast"

The model's containers and the optimizers call every operation through `ops`:
`ops.layernorm_forward` is layers.layernorm_forward on the reference path, and
kernels.layernorm_forward on the fast path. A debugger stepping into model.forward lands in
the reference code unless the fast path was chosen.
"""
import contextlib
from types import SimpleNamespace

from . import adapters, attention, layers, losses, peft, updates

PATHS = ("reference", "fast")  # the paths there are; "fast" is installed by tools/fast.py

REFERENCE = {
    "linear_forward": layers.linear_forward, "linear_backward": layers.linear_backward,
    "embedding_forward": layers.embedding_forward, "embedding_backward": layers.embedding_backward,
    "position_forward": layers.position_forward, "position_backward": layers.position_backward,
    "layernorm_forward": layers.layernorm_forward, "layernorm_backward": layers.layernorm_backward,
    "gelu_forward": layers.gelu_forward, "gelu_backward": layers.gelu_backward,
    "softmax_forward": layers.softmax_forward, "softmax_backward": layers.softmax_backward,
    "dropout_forward": layers.dropout_forward, "dropout_backward": layers.dropout_backward,
    "attention_forward": attention.attention_forward, "attention_backward": attention.attention_backward,
    "attend_forward": attention.attend_forward, "attend_backward": attention.attend_backward,
    "adapter_forward": adapters.adapter_forward, "adapter_backward": adapters.adapter_backward,
    "lora_forward": peft.lora_forward, "lora_backward": peft.lora_backward,
    "prefix_forward": peft.prefix_forward, "prefix_backward": peft.prefix_backward,
    "prefix_mlp_forward": peft.prefix_mlp_forward, "prefix_mlp_backward": peft.prefix_mlp_backward,
    "prompt_forward": peft.prompt_forward, "prompt_backward": peft.prompt_backward,
    "strip_prompt_forward": peft.strip_prompt_forward, "strip_prompt_backward": peft.strip_prompt_backward,
    "cross_entropy_forward": losses.cross_entropy_forward,
    "cross_entropy_backward": losses.cross_entropy_backward,
    "sgd_update": updates.sgd_update, "adamw_update": updates.adamw_update,
    "each_parameter": updates.each_parameter,
}

ops = SimpleNamespace(**REFERENCE)  # what the model calls; use() swaps its functions
_tables = {"reference": REFERENCE}  # path -> {name: function}, as installed
_current = "reference"


def install(path, functions):
    """Make `path` one use() can choose: `functions` {name: function} replaces the reference's
    functions of those names; every other operation stays the reference's."""
    if path not in PATHS or path == "reference":
        raise ValueError(f"path: expected one of {PATHS[1:]}, got {path!r}")
    unknown = sorted(set(functions) - set(REFERENCE))
    if unknown:
        raise ValueError(f"functions: expected names of backend.REFERENCE, got {unknown}")
    _tables[path] = {**REFERENCE, **functions}


def table(path):
    """{name: function} that `path` runs (the reference's where it has no function of its own)."""
    if path not in _tables:
        raise ValueError(f"path: {path!r} is not installed; import minitransformer.tools first "
                         f"(it installs the fast kernels), got the paths {sorted(_tables)}")
    return dict(_tables[path])


def use(path):
    """Run the model on `path`, "reference" or "fast", from now on."""
    global _current
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    for name, fn in table(path).items():
        setattr(ops, name, fn)
    _current = path


@contextlib.contextmanager
def using(path):
    """with using("fast"): ...  runs the block on `path`, then goes back to the path before."""
    before = _current
    use(path)
    try:
        yield
    finally:
        use(before)


def current():
    """The path the model runs on now: "reference" or "fast"."""
    return _current
