"""What one task adds to the frozen base, for every method of the family, and how the model asks
for it block by block. Every task has its own classification head; the rest depends on its config:

    method   config          the task's parameters, named adapters.<task>.<name>
    adapter  AdapterConfig   blocks.<i>.attn|ffn|parallel.{W_down, b_down, W_up, b_up}, and with
                             train_layernorm a copy of every LayerNorm: blocks.<i>.ln1.gamma, ...
    lora     LoRAConfig      blocks.<i>.lora.{A_q, B_q, A_v, B_v, ...} (one pair per target)
    prefix   PrefixConfig    blocks.<i>.prefix.{P_k, P_v}, or through the MLP
                             prefix_mlp.{P0, W_1, b_1, W_2, b_2}
    prompt   PromptConfig    prompt.P
    bitfit   BitFitConfig    copies of the base's biases: blocks.<i>.attn.b_q, blocks.<i>.ffn.b_1,
                             blocks.<i>.ln1.beta, ln_emb.beta, ...
    (all)                    head.W, head.b

One mechanism serves every copy of a base parameter (the adapters' LayerNorms, BitFit's
biases): `own`, a map {base module path: {local name: the task's Parameter}}. The base's
containers read through it (modules.py), so the task's copy is used in place of the base's and
receives the gradient, and the base's own arrays never change.
"""
from dataclasses import dataclass, field, replace

from .adapters import AdapterConfig
from .modules import Adapter, ClassifierHead, LoRA, Parameter, PrefixKV, PrefixMLP, Prompt, normal
from .peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig

METHODS = {"adapter": AdapterConfig, "lora": LoRAConfig, "prefix": PrefixConfig, "prompt": PromptConfig,
           "bitfit": BitFitConfig}
# the names of peft.LORA_TARGETS and peft.BIASES -> (block module, the weight's and the bias's local name)
LORA_WEIGHT = {"q": ("attn", "W_q"), "k": ("attn", "W_k"), "v": ("attn", "W_v"), "o": ("attn", "W_o"),
               "ffn1": ("ffn", "W_1"), "ffn2": ("ffn", "W_2")}
BIAS_OF = {t: (module, "b" + W[1:]) for t, (module, W) in LORA_WEIGHT.items()}


def method_of(config):
    """The method a config stands for: "adapter", "lora", "prefix", "prompt" or "bitfit"."""
    for method, cls in METHODS.items():
        if type(config) is cls:
            return method
    raise TypeError(f"config: expected one of {', '.join(c.__name__ for c in METHODS.values())}, "
                    f"got {type(config).__name__}")


@dataclass
class BlockParts:
    """What the active task adds to one block (all empty for the bare base)."""
    adapters: dict = field(default_factory=dict)  # {"attn"|"ffn"|"parallel": Adapter}
    own: dict = field(default_factory=dict)  # {"attn"|"ffn"|"ln1"|"ln2": {local name: Parameter}}
    lora: LoRA | None = None  # the block's LoRA branches (None when merged into the weights)
    prefix: tuple | None = None  # (P_k, P_v) Parameters, each (n, C)

    def parameters(self):
        """The task's Parameters this block's forward uses."""
        ps = [p for a in self.adapters.values() for p in a.parameters()]
        ps += [p for own in self.own.values() for p in own.values()]
        ps += self.lora.parameters() if self.lora else []
        return ps + list(self.prefix or ())


class AdapterSet:
    """Everything one task adds to the frozen base (see the module doc): its parts by method,
    its own copies of base parameters (`own`), and its head.

    blocks       per block {"attn"|"ffn"|"parallel": Adapter} (method "adapter"; else empty)
    lora         per block a LoRA container or None
    prefix_kv    per block a PrefixKV (prefix without the MLP), or None
    prefix_mlp   a PrefixMLP (prefix with the MLP), or None
    prompt       a Prompt, or None
    own          {base module path: {local name: Parameter}}: the task's copies
    merged       {(block, target): the base weight's original array} while LoRA is merged
    """

    def __init__(self, name, config, n_classes, model, rng):
        self.name, self.config, self.n_classes = name, config, n_classes
        self.method = method_of(config)
        cfg, dt = model.config, model.dtype
        L, C, pre = cfg.n_layers, cfg.d_model, f"adapters.{name}"
        self.blocks = [{} for _ in range(L)]
        self.lora, self.prefix_kv, self.prefix_mlp, self.prompt = [None] * L, [None] * L, None, None
        self.own, self.merged = {}, {}
        if self.method == "adapter":
            self.blocks = [{site: Adapter(f"{pre}.blocks.{i}.{site}", C, config, rng, dt,
                                          skip=site != "parallel")
                            for site in config.sites()} for i in range(L)]
            if config.train_layernorm:  # copies of the base's, so a fresh set changes nothing
                for path, ln in model.norms().items():
                    self._copy(path, ln, ("gamma", "beta"))
        elif self.method == "lora":
            self.lora = [LoRA(f"{pre}.blocks.{i}.lora", C, cfg.d_ff, config, rng, dt) for i in range(L)]
        elif self.method == "prefix" and config.reparameterize:
            self.prefix_mlp = PrefixMLP(f"{pre}.prefix_mlp", config.n_prefix, C, config.hidden, L,
                                        config.init_std, rng, dt)
        elif self.method == "prefix":
            self.prefix_kv = [PrefixKV(f"{pre}.blocks.{i}.prefix",
                                       *(normal(rng, (config.n_prefix, C), config.init_std, dt) for _ in "kv"))
                              for i in range(L)]
        elif self.method == "prompt":
            self.prompt = Prompt(f"{pre}.prompt", config.n_prompt, C, config,
                                 model.embed.p["W_tok"].value, rng, dt)
        elif self.method == "bitfit":
            for i, block in enumerate(model.blocks):
                for b in config.biases:
                    module, local = BIAS_OF[b]
                    self._copy(f"blocks.{i}.{module}", getattr(block, module), (local,))
            if config.layernorm:
                for path, ln in model.norms().items():
                    self._copy(path, ln, ("beta",))
        self.head = ClassifierHead(f"{pre}.head", C, n_classes, cfg.pooling, rng, dt, cfg.init_std)

    def _copy(self, path, module, locals_):
        """The task's own copy of `module`'s parameters `locals_`, equal to the base's at first."""
        own = self.own.setdefault(path, {})
        for k in locals_:
            own[k] = Parameter(f"adapters.{self.name}.{path}.{k}", module.p[k].value.copy())

    # ------------------------------------------------------------------ what the model asks

    def modules(self):
        mods = [a for parts in self.blocks for a in parts.values()]
        mods += [m for m in self.lora + self.prefix_kv if m is not None]
        mods += [m for m in (self.prefix_mlp, self.prompt) if m is not None]
        return mods + [self.head]

    def parameters(self):
        ps = [p for m in self.modules()[:-1] for p in m.parameters()]
        ps += [p for own in self.own.values() for p in own.values()]
        return ps + self.head.parameters()

    def prefixes(self):
        """-> ([(P_k, P_v) Parameters per block] or None, cache for prefix_backward)."""
        if self.prefix_mlp is not None:
            return self.prefix_mlp.forward()
        if self.prefix_kv[0] is not None:
            return [kv.pair() for kv in self.prefix_kv], None
        return None, None

    def prefix_backward(self, cache):
        """Every block's prefix gradient on through the MLP (nothing to do without one)."""
        if self.prefix_mlp is not None:
            self.prefix_mlp.backward(cache)

    def block_parts(self, i, prefixes=None):
        """What this task adds to block i (prefixes: the pairs prefixes() returned)."""
        own = {path.rsplit(".", 1)[1]: p for path, p in self.own.items()
               if path.startswith(f"blocks.{i}.")}
        return BlockParts(adapters=self.blocks[i], own=own, lora=None if self.merged else self.lora[i],
                          prefix=prefixes[i] if prefixes else None)

    def n_prompt(self):
        return self.config.n_prompt if self.prompt is not None else 0

    def n_prefix(self):
        return self.config.n_prefix if self.method == "prefix" else 0

    # ------------------------------------------------------------------ after training

    def drop_prefix_mlp(self):
        """Replace the reparameterising MLP by the prefix it computes (Li & Liang drop it after
        training): the same forward, fewer parameters to store. The config says so from now on
        (reparameterize=False), so the saved task loads as a direct prefix."""
        if self.prefix_mlp is None:
            raise ValueError(f"name: task {self.name!r} has no prefix MLP to drop "
                             f"(method {self.method!r}, {self.config})")
        pairs, _ = self.prefix_mlp.forward()
        self.prefix_kv = [PrefixKV(f"adapters.{self.name}.blocks.{i}.prefix", P_k.value.copy(), P_v.value.copy())
                          for i, (P_k, P_v) in enumerate(pairs)]  # copies: contiguous, owned
        self.prefix_mlp = None
        self.config = replace(self.config, reparameterize=False)


# ----------------------------------------------------------------------------- the parameter report

BASE_GROUPS = ("embeddings", "attention", "FFN", "LayerNorm", "adapters", "heads")
GROUPS = ("embeddings", "attention", "FFN", "LayerNorm", "adapters", "LoRA", "prefix", "prompt", "biases",
          "heads")
ADAPTER_LEAVES = ("W_down", "b_down", "W_up", "b_up")


def group_of(name):
    """The report group of a dotted parameter name (one of GROUPS)."""
    module, leaf = name.rsplit(".", 2)[-2:]  # the module's own name (attn, ffn, ln1, lora, ...), the array's
    if name.startswith("adapters."):
        if ".head." in name:
            return "heads"
        if module.startswith("ln"):
            return "LayerNorm"  # the adapters' LayerNorm copies, BitFit's beta copies
        if module in ("attn", "ffn") and leaf not in ADAPTER_LEAVES:
            return "biases"  # BitFit's copies of b_q ... b_2
        return {"lora": "LoRA", "prefix": "prefix", "prefix_mlp": "prefix", "prompt": "prompt"}.get(module, "adapters")
    if name.startswith("embed."):
        return "embeddings"
    if module.startswith("ln"):
        return "LayerNorm"
    if "head" in module:
        return "heads"
    return {"attn": "attention", "ffn": "FFN"}[module]
