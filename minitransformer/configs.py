"""The model's config and the configs of every method of the parameter-efficient family, one dataclass each, each field
commented: what `Transformer.add_adapter(name, config)` takes.

    ModelConfig     the transformer itself (model.py)
    AdapterConfig   Houlsby et al. (2019) bottleneck adapters (adapters.py)
    LoRAConfig      Hu et al. (2021) low-rank branches beside chosen weights (peft.py)
    PrefixConfig    Li & Liang (2021) trained keys and values in every attention (peft.py)
    PromptConfig    Lester et al. (2021) trained embeddings in front of the input (peft.py)
    BitFitConfig    Ben Zaken et al. (2022) only the biases train
"""
from dataclasses import asdict, dataclass

import numpy as np

from . import sizes
from .layers import ACTIVATIONS
from .validate import choice, flag, integer, number, subset

@dataclass
class ModelConfig:
    vocab_size: int = 128  # V, number of token ids
    max_len: int = 64  # T_max, the longest sequence the position embedding covers
    d_model: int = 64  # C, the width of every hidden state
    n_heads: int = 4  # H; d_model must be divisible by it
    n_layers: int = 2  # number of blocks
    d_ff: int = 256  # F, the feed-forward inner width (4 C in BERT and GPT-2)
    norm: str = "post"  # "post" (BERT, as in the adapter paper) or "pre" (GPT-2)
    causal: bool = False  # True: position t attends only to 0..t (next-token models)
    pooling: str = "first"  # how the classification head pools: "first" or "mean"
    n_classes: int = 0  # classes of the base's own classification head; 0: none
    dropout: float = 0.0  # after the embeddings and after each sub-layer's output projection
    ln_eps: float = 1e-5  # LayerNorm's epsilon
    init_std: float = 0.02  # std of the normal init of every weight matrix and embedding
    dtype: str = "float32"  # "float32" to train, "float64" for gradient checks

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff"):
            integer(name, getattr(self, name))
        integer("n_classes", self.n_classes, least=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}, "
                             f"got d_model={self.d_model}")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"norm: expected 'post' or 'pre', got {self.norm!r}")
        flag("causal", self.causal)
        if self.pooling not in ("first", "mean"):
            raise ValueError(f"pooling: expected 'first' or 'mean', got {self.pooling!r}")
        number("dropout", self.dropout, "0 <= p < 1", lambda p: 0 <= p < 1)
        number("ln_eps", self.ln_eps, "a number > 0", lambda eps: eps > 0)
        number("init_std", self.init_std, "a number >= 0", lambda std: std >= 0)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")
        n = sizes.parameter_count(self)  # refused here, before a Transformer allocates them
        sizes.check_fits(n * np.dtype(self.dtype).itemsize,
                         f"ModelConfig: {n:,} parameters (vocab_size={self.vocab_size}, "
                         f"d_model={self.d_model}, d_ff={self.d_ff}, n_layers={self.n_layers})")

    def to_dict(self):
        return asdict(self)


# ----------------------------------------------------------------------------- the adapter

PLACEMENTS = ("houlsby", "ffn", "parallel")


@dataclass
class AdapterConfig:
    """How one task's adapters look and what trains with them.

    placement:
      "houlsby"  - the paper: an adapter on the attention sub-layer's output and one on the
                   feed-forward sub-layer's output, each *before* the residual add and LayerNorm.
      "ffn"      - Pfeiffer et al. (2021): only the feed-forward adapter, same position.
      "parallel" - He et al. (2022): a branch W_up f(W_down x) without its own skip, fed with the
                   feed-forward sub-layer's input and added to its output.
    train_layernorm:
      True  - the paper: every LayerNorm is trained with the adapters. Each task then keeps its
              own copy of the LayerNorm parameters (~2C per LayerNorm), so tasks never interfere.
      False - the AdapterHub library's default: LayerNorms stay frozen with the base, and only
              the adapters and the head are trained.
    """
    bottleneck: int | None = 64  # m, the adapter's inner width; or set reduction_factor instead
    reduction_factor: float | None = None  # C / m; overrides bottleneck when given
    nonlinearity: str = "gelu"  # f in the bottleneck: "gelu" (authors' code), "relu" or "tanh"
    init_std: float = 1e-3  # std of the truncated normal (cut at +-2 std) for W_down and W_up
    zero_init_up: bool = False  # W_up = 0: the adapter is exactly the identity at init
    placement: str = "houlsby"  # "houlsby", "ffn" or "parallel" (see above)
    train_layernorm: bool = True  # the paper trains LayerNorms; AdapterHub keeps them frozen
    scaling: float = 1.0  # multiplies the bottleneck branch (He et al. use s > 1 for parallel)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, got {self.placement!r}")
        if self.nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity: expected one of {tuple(ACTIVATIONS)}, "
                             f"got {self.nonlinearity!r}")
        if self.bottleneck is None and self.reduction_factor is None:
            raise ValueError("bottleneck: give a bottleneck size m or a reduction_factor, got neither")
        if self.bottleneck is not None:
            integer("bottleneck", self.bottleneck, expected="a positive integer m")
        if self.reduction_factor is not None:
            number("reduction_factor", self.reduction_factor, "a number > 0", lambda r: r > 0)
        number("init_std", self.init_std, "a number >= 0", lambda std: std >= 0)
        flag("zero_init_up", self.zero_init_up)
        flag("train_layernorm", self.train_layernorm)
        number("scaling", self.scaling, "a number > 0", lambda s: s > 0)

    def size(self, d_model):
        """The bottleneck width m for a model of width d_model."""
        m = int(round(d_model / self.reduction_factor)) if self.reduction_factor is not None \
            else self.bottleneck
        if not 1 <= m:
            raise ValueError(f"bottleneck: expected m >= 1 for d_model={d_model}, got {m}")
        return m

    def sites(self):
        """Where in each block this config puts adapters: a subset of ("attn", "ffn", "parallel")."""
        return {"houlsby": ("attn", "ffn"), "ffn": ("ffn",), "parallel": ("parallel",)}[self.placement]

    def to_dict(self):
        return asdict(self)


# ----------------------------------------------------------------------------- the rest of the family

LORA_TARGETS = ("q", "k", "v", "o", "ffn1", "ffn2")  # W_q, W_k, W_v, W_o, the FFN's W_1 and W_2
BIASES = LORA_TARGETS  # the same six linear layers, each with its bias b_q ... b_1, b_2


@dataclass
class LoRAConfig:
    """Hu et al. (2021): a trainable low-rank update beside chosen frozen weight matrices."""
    r: int = 8  # the rank: A is (d_in, r), B is (r, d_out)
    alpha: float = 8.0  # the update is scaled by s = alpha / r; the paper keeps alpha fixed as r varies
    targets: tuple = ("q", "v")  # the weights that get a branch: any of LORA_TARGETS; ("q", "v") as in the paper
    init: str = "kaiming"  # A's init: "kaiming" U(-1/sqrt(d_in), 1/sqrt(d_in)) (loralib's and PEFT's
    #                        default: A's scale does not depend on r) or "gaussian" N(0, 1/r^2) (the
    #                        paper's Gaussian at PEFT's scale: with alpha fixed, small r then steps harder)

    def __post_init__(self):
        integer("r", self.r)
        number("alpha", self.alpha, "a number > 0", lambda a: a > 0)
        self.targets = subset("targets", self.targets, LORA_TARGETS)
        choice("init", self.init, ("gaussian", "kaiming"))

    @property
    def scale(self):
        """s = alpha / r, the factor of the low-rank update."""
        return self.alpha / self.r

    def to_dict(self):
        return asdict(self)


@dataclass
class PrefixConfig:
    """Li & Liang (2021): n trained keys and values in front of every layer's attention."""
    n_prefix: int = 8  # n, the prefix length (in every layer)
    reparameterize: bool = True  # train through the paper's MLP (P' -> every layer's P_k, P_v);
    #                              False: train each layer's P_k, P_v directly
    hidden: int = 64  # h, the MLP's inner width (only with reparameterize)
    init_std: float = 0.5  # std of the normal init of P_k, P_v (direct) or of P' (with the MLP)

    def __post_init__(self):
        integer("n_prefix", self.n_prefix)
        flag("reparameterize", self.reparameterize)
        integer("hidden", self.hidden)
        number("init_std", self.init_std, "a number >= 0", lambda s: s >= 0)

    def to_dict(self):
        return asdict(self)


@dataclass
class PromptConfig:
    """Lester et al. (2021): n trained embeddings in front of the embedded input sequence."""
    n_prompt: int = 8  # n, the soft prompt's length
    init: str = "vocab"  # "vocab": copies of randomly drawn token embeddings (the paper's best);
    #                      "normal": N(0, init_std^2)
    init_std: float = 0.02  # std of the "normal" init (unused by "vocab")

    def __post_init__(self):
        integer("n_prompt", self.n_prompt)
        choice("init", self.init, ("vocab", "normal"))
        number("init_std", self.init_std, "a number >= 0", lambda s: s >= 0)

    def to_dict(self):
        return asdict(self)


@dataclass
class BitFitConfig:
    """Ben Zaken et al. (2022): only bias terms (and the task head) train."""
    biases: tuple = BIASES  # the linear layers whose bias trains: any of BIASES (all, as in the paper)
    layernorm: bool = True  # also every LayerNorm's beta, which the paper counts among the biases

    def __post_init__(self):
        self.biases = subset("biases", self.biases, BIASES, allow_empty=True)
        flag("layernorm", self.layernorm)
        if not self.biases and not self.layernorm:
            raise ValueError("biases: expected at least one bias to train, got none "
                             "(biases=() and layernorm=False)")

    def to_dict(self):
        return asdict(self)
