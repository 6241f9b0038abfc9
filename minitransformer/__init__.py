"""minitransformer: a transformer, Houlsby adapters and the rest of the parameter-efficient family
(LoRA, prefix tuning, prompt tuning, BitFit) in NumPy, every backward pass by hand.

    from minitransformer import ModelConfig, Transformer, AdapterConfig, LoRAConfig

    model = Transformer(ModelConfig(n_layers=2))
    model.add_adapter("sentiment", AdapterConfig(bottleneck=8), n_classes=2)
    model.train_adapter("sentiment")          # only the adapter, its LayerNorms and head train
    model.add_adapter("lora", LoRAConfig(r=4), n_classes=2)   # or PrefixConfig, PromptConfig, BitFitConfig
    logits, loss = model.loss(ids, labels, head="cls", backward=True)

Where to start reading: README.md, "Reading the code".
"""
import sys as _sys

if _sys.argv[:1] == ["-m"]:  # python -m minitransformer, still loading: a signal now ends it in one line
    import signal as _signal

    def _starting(signum, frame):
        print(f"minitransformer: error: interrupted while starting ({_signal.Signals(signum).name})",
              file=_sys.stderr, flush=True)
        # Exit at once: an exception raised here could land inside an extension's import (NumPy's
        # import of datetime turns it into an ImportError with a traceback). Nothing is written yet.
        import os as _os
        _os._exit(128 + signum)  # the commands' own handlers replace this one once they start

    for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(_signal, _name):
            _signal.signal(getattr(_signal, _name), _starting)

from .tools import runtime as _runtime  # noqa: F401  first: it sets how NumPy's BLAS runs, before NumPy loads
from .adapters import AdapterConfig  # noqa: E402
from .model import ModelConfig, Transformer  # noqa: E402
from .modules import Parameter  # noqa: E402
from .peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig  # noqa: E402

__all__ = ["AdapterConfig", "BitFitConfig", "LoRAConfig", "ModelConfig", "Parameter", "PrefixConfig",
           "PromptConfig", "Transformer"]
