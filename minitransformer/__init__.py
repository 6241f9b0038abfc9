"""minitransformer: a transformer and Houlsby adapters in NumPy, every backward pass by hand.

    from minitransformer import ModelConfig, Transformer, AdapterConfig

    model = Transformer(ModelConfig(n_layers=2))
    model.add_adapter("sentiment", AdapterConfig(bottleneck=8), n_classes=2)
    model.train_adapter("sentiment")          # only the adapter, its LayerNorms and head train
    logits, loss = model.loss(ids, labels, head="cls", backward=True)

Where to start reading: README.md, "Reading the code".
"""
from .tools import runtime as _runtime  # noqa: F401  first: it sets how NumPy's BLAS runs, before NumPy loads
from .adapters import AdapterConfig  # noqa: E402
from .model import ModelConfig, Transformer  # noqa: E402
from .modules import Parameter  # noqa: E402

__all__ = ["AdapterConfig", "ModelConfig", "Parameter", "Transformer"]
