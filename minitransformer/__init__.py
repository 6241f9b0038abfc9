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
# The names below are imported when first used (PEP 562), so `import minitransformer` runs no code
# of the tools floor and `python -m minitransformer` can set how NumPy's BLAS runs before NumPy loads.
_EXPORTS = {"AdapterConfig": "configs", "BitFitConfig": "configs", "LoRAConfig": "configs",
            "ModelConfig": "configs", "PrefixConfig": "configs", "PromptConfig": "configs",
            "Parameter": "modules", "Transformer": "model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minitransformer' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
