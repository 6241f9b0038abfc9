"""minitransformer: a transformer and Houlsby adapters in NumPy, every backward pass by hand."""
from .adapters import AdapterConfig
from .model import ModelConfig, Transformer
from .modules import Parameter

__all__ = ["AdapterConfig", "ModelConfig", "Parameter", "Transformer"]
