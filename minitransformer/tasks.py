"""What one task adds to the frozen base, for every method of the family. Every task has its own
classification head; the rest depends on its config:

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

A task changes the base's forward only by the modules it puts into the base's slots
(Task.plugs): an adapter into a sub-layer's adapter slot, a LayerNorm or a linear layer that
holds the task's own copy of a parameter (the paper's LayerNorms, BitFit's biases) in place of
the base's, a linear layer with a LoRA branch beside the shared W, a prefix into the attention's
key/value hook. The base's own arrays never change (merge excepted, which unmerge undoes).
"""
from dataclasses import replace

from .configs import AdapterConfig, BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig
from .heads import ClassifierHead
from .modules import Adapter, Linear, Parameter, copy_of, normal
from .peft import lora_merge
from .parts import LoRA, PrefixKV, PrefixMLP, Prompt, Strip

METHODS = {"adapter": AdapterConfig, "lora": LoRAConfig, "prefix": PrefixConfig, "prompt": PromptConfig,
           "bitfit": BitFitConfig}
# the names of configs.LORA_TARGETS and configs.BIASES -> (block module, its linear slot, the weight's local name)
LINEARS = {"q": ("attn", "q_proj", "W_q"), "k": ("attn", "k_proj", "W_k"), "v": ("attn", "v_proj", "W_v"),
           "o": ("attn", "o_proj", "W_o"), "ffn1": ("ffn", "fc1", "W_1"), "ffn2": ("ffn", "fc2", "W_2")}
SITES = {"attn": "sub1.adapter", "ffn": "sub2.adapter", "parallel": "sub2.parallel"}  # adapter -> slot


def method_of(config):
    """The method a config stands for: "adapter", "lora", "prefix", "prompt" or "bitfit"."""
    for method, cls in METHODS.items():
        if type(config) is cls:
            return method
    raise TypeError(f"config: expected one of {', '.join(c.__name__ for c in METHODS.values())}, "
                    f"got {type(config).__name__}")


class Task:
    """Everything one task adds to the frozen base (see the module doc): its parts by method,
    its own copies of base parameters, and its head.

    blocks       per block {"attn"|"ffn"|"parallel": Adapter} (method "adapter"; else empty)
    lora         per block a LoRA container or None
    prefix_kv    per block a PrefixKV (prefix without the MLP), or None
    prefix_mlp   a PrefixMLP (prefix with the MLP), or None
    prompt       a Prompt, or None
    copies       {base module path: {local name: Parameter}}: the task's copies
    merged       {(block, target): the base weight's original array} while LoRA is merged
    """

    def __init__(self, name, config, n_classes, model, rng):
        self.name, self.config, self.n_classes = name, config, n_classes
        self.method = method_of(config)
        cfg, dt = model.config, model.dtype
        L, C, pre = cfg.n_layers, cfg.d_model, f"adapters.{name}"
        self.blocks = [{} for _ in range(L)]
        self.lora, self.prefix_kv, self.prefix_mlp, self.prompt = [None] * L, [None] * L, None, None
        self.copies, self.merged, self._swaps = {}, {}, {}
        norms = model.norms()
        if self.method == "adapter":
            self.blocks = [{site: Adapter(f"{pre}.blocks.{i}.{site}", C, config, rng, dt,
                                          skip=site != "parallel")
                            for site in config.sites()} for i in range(L)]
            if config.train_layernorm:  # copies of the base's, so a fresh task changes nothing
                for path, ln in norms.items():
                    self._swaps[path] = copy_of(ln, self._copy(path, ln, ("gamma", "beta")))
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
                    module, slot, W = LINEARS[b]
                    base = getattr(block, module)  # the copy of b, beside the base's own W
                    own = self._copy(f"blocks.{i}.{module}", base, ("b" + W[1:],))
                    self._swaps[f"blocks.{i}.{module}.{slot}"] = Linear(base.p[W], own["b" + W[1:]])
            if config.layernorm:
                for path, ln in norms.items():
                    self._swaps[path] = copy_of(ln, self._copy(path, ln, ("beta",)))
        self.head = ClassifierHead(f"{pre}.head", C, n_classes, cfg.pooling, rng, dt, cfg.init_std)

    def _copy(self, path, module, locals_):
        """The task's own copy of `module`'s parameters `locals_`, equal to the base's at first."""
        own = self.copies.setdefault(path, {})
        for k in locals_:
            own[k] = Parameter(f"adapters.{self.name}.{path}.{k}", module.p[k].value.copy())
        return {k: own[k] for k in locals_}

    # ------------------------------------------------------------------ what the model asks

    def modules(self):
        mods = [a for parts in self.blocks for a in parts.values()]
        mods += [m for m in self.lora + self.prefix_kv if m is not None]
        mods += [m for m in (self.prefix_mlp, self.prompt) if m is not None]
        return mods + [self.head]

    def parameters(self):
        ps = [p for m in self.modules()[:-1] for p in m.parameters()]
        ps += [p for own in self.copies.values() for p in own.values()]
        return ps + self.head.parameters()

    def precompute(self):
        """What the task computes from its parameters before each forward -> (pieces, cache):
        the prefix MLP's PrefixKV for every block ([PrefixKV per block]); None for the rest."""
        if self.prefix_mlp is not None:
            return self.prefix_mlp.forward()
        return None, None

    def precompute_backward(self, cache):
        """precompute in reverse: every block's prefix gradient on through the MLP (nothing
        to do without one)."""
        if self.prefix_mlp is not None:
            self.prefix_mlp.backward(cache)

    def plugs(self, model, pieces=None):
        """{slot path: module} of everything this task puts into the base (pieces: what
        precompute() returned); a slot not named keeps the base's own."""
        plugs = dict(self._swaps)
        if self.prompt is not None:  # the soft prompt in front of the blocks; the heads see past it
            plugs["front"], plugs["back"] = self.prompt, Strip(self.config.n_prompt)
        prefixes = pieces or (self.prefix_kv if self.prefix_kv[0] is not None else None)
        for i, block in enumerate(model.blocks):
            for site, adapter in self.blocks[i].items():
                plugs[f"blocks.{i}.{SITES[site]}"] = adapter
            if self.lora[i] is not None and not self.merged:  # a branch beside the shared W
                for t, branch in self.lora[i].branches.items():
                    module, slot, W = LINEARS[t]
                    base = getattr(block, module)
                    plugs[f"blocks.{i}.{module}.{slot}"] = Linear(base.p[W], base.p["b" + W[1:]], branch)
            if prefixes:
                plugs[f"blocks.{i}.attn.kv"] = prefixes[i]
        return plugs

    def swapped(self):
        """The names of the base's parameters this task's copies stand in for."""
        return {f"{path}.{k}" for path, own in self.copies.items() for k in own}

    def n_prompt(self):
        return self.config.n_prompt if self.prompt is not None else 0

    def n_prefix(self):
        return self.config.n_prefix if self.method == "prefix" else 0

    # ------------------------------------------------------------------ merge, and after training

    def merge(self, model):
        """Fold the LoRA branches into the base weights, W <- W + s A B (peft.lora_merge),
        keeping the original arrays to put back (unmerge)."""
        for i, (block, lora) in enumerate(zip(model.blocks, self.lora)):
            for t in lora.targets:
                module, _, W = LINEARS[t]
                weight = getattr(block, module).p[W]
                self.merged[(i, t)] = weight.value  # the original array itself: nothing writes into it
                weight.value = lora_merge(weight.value, lora.p[f"A_{t}"].value, lora.p[f"B_{t}"].value,
                                          lora.scale)

    def unmerge(self, model):
        """Put back the base weights merge replaced: the very arrays, bit for bit."""
        for (i, t), original in self.merged.items():
            module, _, W = LINEARS[t]
            getattr(model.blocks[i], module).p[W].value = original
        self.merged = {}

    def drop_prefix_mlp(self):
        """Replace the reparameterising MLP by the prefix it computes (Li & Liang drop it after
        training): the same forward, fewer parameters to store. The config says so from now on
        (reparameterize=False), so the saved task loads as a direct prefix."""
        if self.prefix_mlp is None:
            raise ValueError(f"name: task {self.name!r} has no prefix MLP to drop "
                             f"(method {self.method!r}, {self.config})")
        kvs, _ = self.prefix_mlp.forward()
        self.prefix_kv = [PrefixKV(f"adapters.{self.name}.blocks.{i}.prefix", kv.p["P_k"].value.copy(),
                                   kv.p["P_v"].value.copy())
                          for i, kv in enumerate(kvs)]  # copies: contiguous, owned
        self.prefix_mlp = None
        self.config = replace(self.config, reparameterize=False)
