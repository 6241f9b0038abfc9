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
from .tools import runtime as _runtime  # noqa: F401  first: it sets how NumPy's BLAS runs, before NumPy loads
from .adapters import AdapterConfig  # noqa: E402
from .model import ModelConfig, Transformer  # noqa: E402
from .modules import Parameter  # noqa: E402
from .peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig  # noqa: E402

__all__ = ["AdapterConfig", "BitFitConfig", "LoRAConfig", "ModelConfig", "Parameter", "PrefixConfig",
           "PromptConfig", "Transformer"]
