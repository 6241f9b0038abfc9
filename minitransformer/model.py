"""The transformer: config, block, model, heads, named parameters, freezing and adapters.

    ids (B, T) -> embeddings (B, T, C) -> N blocks -> heads
      "lm":  per-position logits (B, T, V)   (masked-token or next-token objectives)
      "cls": one logit vector per sequence (B, K), from the active adapter's head if any

Post-LN block (BERT, the architecture the adapter paper adapted):
    x = LN1(x + Adapter_attn(Attn(x)));  x = LN2(x + Adapter_ffn(FFN(x)))
Pre-LN block (GPT-2): x = x + Adapter_attn(Attn(LN1(x)));  x = x + Adapter_ffn(FFN(LN2(x)))
"""
import fnmatch
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import sizes
from .adapters import AdapterConfig
from .attention import attention_bias
from .layers import dropout_backward, dropout_forward
from .losses import cross_entropy_backward, cross_entropy_forward
from .modules import (Adapter, Attention, ClassifierHead, Embeddings, FeedForward, LayerNorm,
                      LMHead)
from .validate import flag, integer, number


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


# ----------------------------------------------------------------------------- one task's adapters


class AdapterSet:
    """Everything one task adds to the frozen base: adapters in every block, the task head,
    and (when the paper's setting trains LayerNorms) the task's own copy of every LayerNorm.
    Its parameters are named adapters.<task>.blocks.<i>.attn.W_down, adapters.<task>.head.W, ...
    """

    def __init__(self, name, config, n_classes, model, rng):
        self.name, self.config, self.n_classes = name, config, n_classes
        cfg, dt = model.config, model.dtype
        prefix = f"adapters.{name}"
        self.blocks = [{site: Adapter(f"{prefix}.blocks.{i}.{site}", cfg.d_model, config, rng, dt,
                                      skip=site != "parallel")
                        for site in config.sites()} for i in range(cfg.n_layers)]
        self.head = ClassifierHead(f"{prefix}.head", cfg.d_model, n_classes, cfg.pooling, rng, dt,
                                   cfg.init_std)
        # per-task LayerNorms start as copies of the base's, so a fresh set changes nothing
        self.norms = {}
        if config.train_layernorm:
            for key, ln in model.norms().items():
                own = LayerNorm(f"{prefix}.{key}", cfg.d_model, dt, cfg.ln_eps)
                for k in own.p:
                    own.p[k].value = ln.p[k].value.copy()
                self.norms[key] = own

    def modules(self):
        return [a for parts in self.blocks for a in parts.values()] + list(self.norms.values()) \
            + [self.head]

    def parameters(self):
        return [p for m in self.modules() for p in m.parameters()]


# ----------------------------------------------------------------------------- the block


class Block:
    """attention -> adapter -> add & norm -> FFN -> adapter -> add & norm (post-LN), or pre-LN."""

    def __init__(self, i, cfg, rng, dtype):
        self.pre = cfg.norm == "pre"
        self.dropout = cfg.dropout
        C = cfg.d_model
        self.attn = Attention(f"blocks.{i}.attn", C, cfg.n_heads, rng, dtype, cfg.init_std)
        self.ln1 = LayerNorm(f"blocks.{i}.ln1", C, dtype, cfg.ln_eps)
        self.ffn = FeedForward(f"blocks.{i}.ffn", C, cfg.d_ff, rng, dtype, cfg.init_std)
        self.ln2 = LayerNorm(f"blocks.{i}.ln2", C, dtype, cfg.ln_eps)

    def modules(self):
        return [self.attn, self.ln1, self.ffn, self.ln2]

    def forward(self, x, bias, ln1, ln2, adapters, train=False, rng=None):
        """x (B, T, C) -> (B, T, C). ln1/ln2: the LayerNorms in use (the base's or the task's);
        adapters: {"attn"|"ffn"|"parallel": Adapter} of the active task, or {}."""
        # --- attention sub-layer
        a_in, c_ln1 = ln1.forward(x) if self.pre else (x, None)
        a, c_attn = self.attn.forward(a_in, bias)  # (B,T,C)
        a, c_drop1 = dropout_forward(a, self.dropout, rng, train)
        c_ad1 = None
        if "attn" in adapters:  # the paper: on the sub-layer output, before the residual add
            a, c_ad1 = adapters["attn"].forward(a)
        h = x + a  # residual
        if not self.pre:
            h, c_ln1 = ln1.forward(h)
        # --- feed-forward sub-layer
        f_in, c_ln2 = ln2.forward(h) if self.pre else (h, None)
        f, c_ffn = self.ffn.forward(f_in)  # (B,T,C)
        f, c_drop2 = dropout_forward(f, self.dropout, rng, train)
        c_ad2 = c_par = None
        if "ffn" in adapters:
            f, c_ad2 = adapters["ffn"].forward(f)
        if "parallel" in adapters:  # He et al.: a branch beside the FFN, same input, outputs add
            branch, c_par = adapters["parallel"].forward(f_in)
            f = f + branch
        out = h + f  # residual
        if not self.pre:
            out, c_ln2 = ln2.forward(out)
        cache = (ln1, ln2, adapters, c_ln1, c_attn, c_drop1, c_ad1, c_ln2, c_ffn, c_drop2, c_ad2, c_par)
        return out, cache

    def backward(self, dout, cache, need_dx=True):
        """dout (B, T, C) -> dx (B, T, C), or None when nothing below needs it."""
        ln1, ln2, adapters, c_ln1, c_attn, c_drop1, c_ad1, c_ln2, c_ffn, c_drop2, c_ad2, c_par = cache
        # --- feed-forward sub-layer, in reverse
        dres = ln2.backward(dout, c_ln2) if not self.pre else dout  # d(h + f)
        df = dres  # out = h + f: both branches get the same gradient
        df_in = None
        if "parallel" in adapters:
            df_in = adapters["parallel"].backward(df, c_par)
        if "ffn" in adapters:
            df = adapters["ffn"].backward(df, c_ad2)
        df = dropout_backward(df, c_drop2)
        dffn_in = self.ffn.backward(df, c_ffn)
        df_in = dffn_in if df_in is None else df_in + dffn_in
        if self.pre:  # f_in = LN2(h); h also goes straight to the output
            dh = dres + ln2.backward(df_in, c_ln2)
        else:  # f_in = h, which also goes straight to the residual
            dh = dres + df_in
        # --- attention sub-layer, in reverse
        if not self.pre:
            dh = ln1.backward(dh, c_ln1)  # h = LN1(x + a)
        da = dh
        if "attn" in adapters:
            da = adapters["attn"].backward(da, c_ad1)
        da = dropout_backward(da, c_drop1)
        if self.pre:  # a_in = LN1(x): LN1 may train even when x's own gradient is not wanted
            da_in = self.attn.backward(da, c_attn, need_dx=need_dx or bool(ln1.trainable()))
            if da_in is not None:
                da_in = ln1.backward(da_in, c_ln1, need_dx=need_dx)
            return dh + da_in if need_dx else None
        da_in = self.attn.backward(da, c_attn, need_dx=need_dx)  # skips dx when not wanted
        return dh + da_in if need_dx else None  # x fed both the attention and the residual


# ----------------------------------------------------------------------------- the model


class Transformer:
    """Embeddings -> blocks -> (final LayerNorm when pre-LN) -> heads, with named parameters,
    freezing by name pattern, and named per-task adapters on one shared base."""

    def __init__(self, config, seed=0):
        self.config = cfg = config
        self.dtype = np.dtype(cfg.dtype)
        rng = np.random.default_rng(seed)
        C = cfg.d_model
        self.embed = Embeddings("embed", cfg.vocab_size, cfg.max_len, C, rng, self.dtype, cfg.init_std)
        # BERT normalises the embeddings (post-LN); GPT-2 normalises the last block's output (pre-LN)
        self.ln_emb = LayerNorm("ln_emb", C, self.dtype, cfg.ln_eps) if cfg.norm == "post" else None
        self.blocks = [Block(i, cfg, rng, self.dtype) for i in range(cfg.n_layers)]
        self.ln_f = LayerNorm("ln_f", C, self.dtype, cfg.ln_eps) if cfg.norm == "pre" else None
        self.lm_head = LMHead("lm_head", C, cfg.vocab_size, rng, self.dtype, cfg.init_std)
        self.cls_head = None
        if cfg.n_classes:
            self.add_classifier(cfg.n_classes, seed=seed + 1)
        self.adapters = {}  # task name -> AdapterSet
        self.active_adapter = None

    # ------------------------------------------------------------------ parameters

    def norms(self):
        """The base's LayerNorms by name: {"ln_emb" or "ln_f", "blocks.0.ln1", ...}."""
        out = {"ln_emb": self.ln_emb} if self.ln_emb else {}
        for i, b in enumerate(self.blocks):
            out[f"blocks.{i}.ln1"], out[f"blocks.{i}.ln2"] = b.ln1, b.ln2
        if self.ln_f:
            out["ln_f"] = self.ln_f
        return out

    def base_modules(self):
        mods = [self.embed] + ([self.ln_emb] if self.ln_emb else [])
        mods += [m for b in self.blocks for m in b.modules()]
        mods += ([self.ln_f] if self.ln_f else []) + [self.lm_head]
        return mods + ([self.cls_head] if self.cls_head else [])

    def named_parameters(self):
        """{dotted name: Parameter} for the base and every adapter set, in a fixed order."""
        params = [p for m in self.base_modules() for p in m.parameters()]
        params += [p for s in self.adapters.values() for p in s.parameters()]
        return {p.name: p for p in params}

    def parameters(self, trainable_only=False):
        return [p for p in self.named_parameters().values() if p.trainable or not trainable_only]

    def num_parameters(self, trainable_only=False):
        return sum(p.value.size for p in self.parameters(trainable_only))

    def zero_grad(self):
        """Forget every gradient: each parameter's grad goes back to None (empty)."""
        for p in self.parameters():
            p.grad = None

    def _match(self, patterns):
        params = self.named_parameters()
        if not patterns:
            return list(params.values())
        hits = [p for n, p in params.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not hits:
            raise ValueError(f"patterns: expected at least one parameter name to match {patterns}, "
                             f"got none (names look like {next(iter(params))!r})")
        return hits

    def freeze(self, *patterns):
        """Freeze the parameters whose names match any fnmatch pattern (all when none given)."""
        for p in self._match(patterns):
            p.trainable, p.grad = False, None

    def unfreeze(self, *patterns):
        for p in self._match(patterns):
            p.trainable = True

    def add_classifier(self, n_classes, seed=0):
        """A fresh base classification head cls_head.W (C, K), cls_head.b (K,)."""
        rng = np.random.default_rng(seed)
        # the config must describe the model, or a saved base would not load: a new config,
        # not an edit of one another model may share
        self.config = replace(self.config, n_classes=n_classes)
        self.cls_head = ClassifierHead("cls_head", self.config.d_model, n_classes,
                                       self.config.pooling, rng, self.dtype, self.config.init_std)
        return self.cls_head

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name, config=None, n_classes=2, seed=0):
        """Add a named adapter set (one per task, with its own classification head)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: expected an identifier like 'sentiment', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"name: an adapter called {name!r} exists already")
        config = AdapterConfig() if config is None else config
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config: expected an AdapterConfig, got {type(config).__name__}")
        integer("n_classes", n_classes, least=2)
        integer("seed", seed, least=0)
        n = sizes.adapter_parameter_count(self.config, config, n_classes)
        sizes.check_fits(n * self.dtype.itemsize, f"config: an adapter set with bottleneck "
                         f"m={config.size(self.config.d_model)} ({n:,} parameters)")
        self.adapters[name] = AdapterSet(name, config, n_classes, self, np.random.default_rng(seed))
        return self.adapters[name]

    def delete_adapter(self, name):
        self.get_adapter(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def get_adapter(self, name):
        """The AdapterSet called `name` (a KeyError naming the adapters there are, if none)."""
        if name not in self.adapters:
            raise KeyError(f"name: expected one of the adapters {sorted(self.adapters)}, got {name!r}")
        return self.adapters[name]

    def set_active_adapter(self, name):
        """Route the forward pass through adapter `name`, or through the bare base (None)."""
        if name is not None:
            self.get_adapter(name)
        self.active_adapter = name

    def train_adapter(self, name):
        """Activate adapter `name` and freeze everything else: what trains is its adapters,
        its head and, in the paper's setting (train_layernorm=True), its own LayerNorms."""
        self.set_active_adapter(name)
        self.freeze()
        self.unfreeze(f"adapters.{name}.*")

    # ------------------------------------------------------------------ forward and backward

    def _check_inputs(self, ids, pad_mask):
        cfg = self.config
        if not isinstance(ids, np.ndarray) or not np.issubdtype(ids.dtype, np.integer):
            got = ids.dtype if isinstance(ids, np.ndarray) else type(ids).__name__
            raise TypeError(f"ids: expected an integer numpy array of token ids, got {got}")
        if ids.ndim != 2:
            raise ValueError(f"ids: expected shape (batch, seq_len), got shape {ids.shape}")
        if ids.size == 0:
            raise ValueError(f"ids: expected at least one sequence of at least one token, "
                             f"got shape {ids.shape}")
        if ids.shape[1] > cfg.max_len:
            raise ValueError(f"ids: expected seq_len <= max_len={cfg.max_len}, got seq_len={ids.shape[1]}")
        s = self.adapters[self.active_adapter].config if self.active_adapter else None
        sizes.check_fits(sizes.activation_count(cfg, *ids.shape, s) * self.dtype.itemsize,
                         f"ids: a batch of shape {ids.shape} (split it into smaller batches)")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = ids[(ids < 0) | (ids >= cfg.vocab_size)].flat[0]
            raise ValueError(f"ids: expected token ids in [0, {cfg.vocab_size}), got {bad}")
        if pad_mask is not None:
            if not isinstance(pad_mask, np.ndarray) or pad_mask.dtype != bool or pad_mask.shape != ids.shape:
                got = (pad_mask.dtype, pad_mask.shape) if isinstance(pad_mask, np.ndarray) else type(pad_mask)
                raise ValueError(f"pad_mask: expected a bool array of shape {ids.shape}, got {got}")

    def _parts(self):
        """The LayerNorms and adapters of the active task (or the bare base's)."""
        s = self.adapters[self.active_adapter] if self.active_adapter else None
        norms = self.norms()
        if s is not None:
            norms.update(s.norms)
        return s, norms

    def forward(self, ids, pad_mask=None, head="lm", train=False, rng=None):
        """ids (B, T) ints, pad_mask (B, T) bool (True = real token) -> logits, cache.

        head "lm" -> (B, T, V); head "cls" -> (B, K) from the active adapter's head, or from
        the base's cls_head when no adapter is active. train=True turns dropout on, drawing its
        masks from `rng` (a np.random.Generator).
        """
        self._check_inputs(ids, pad_mask)
        cfg = self.config
        s, norms = self._parts()
        x, c_emb = self.embed.forward(ids)  # (B,T,C)
        c_ln_emb = None
        if self.ln_emb:
            x, c_ln_emb = norms["ln_emb"].forward(x)
        x, c_drop = dropout_forward(x, cfg.dropout, rng, train)
        bias = attention_bias(ids.shape[1], cfg.causal, pad_mask, self.dtype)  # None or (B|1,1,T,T)
        c_blocks = []
        for i, block in enumerate(self.blocks):
            x, c = block.forward(x, bias, norms[f"blocks.{i}.ln1"], norms[f"blocks.{i}.ln2"],
                                 s.blocks[i] if s else {}, train, rng)
            c_blocks.append(c)
        c_ln_f = None
        if self.ln_f:
            x, c_ln_f = norms["ln_f"].forward(x)
        head_mod = self._head(head, s)
        logits, c_head = head_mod.forward(x, pad_mask)
        cache = (norms, head_mod, c_emb, c_ln_emb, c_drop, c_blocks, c_ln_f, c_head)
        return logits, cache

    def _head(self, head, s):
        if head == "lm":
            return self.lm_head
        if head != "cls":
            raise ValueError(f"head: expected 'lm' or 'cls', got {head!r}")
        if s is not None:
            return s.head
        if self.cls_head is None:
            raise ValueError("head: 'cls' needs an active adapter or a base classifier "
                             "(model.add_classifier(n_classes)), got neither")
        return self.cls_head

    def backward(self, dlogits, cache):
        """Accumulate the gradient of every trainable parameter; frozen ones get none.

        Gradients flow down only as far as something still trains: a block whose input
        gradient nobody below needs skips that product (block 0 under a frozen base and its
        embeddings), and blocks with nothing trainable in or under them are not visited at
        all (head-only training stops at the head).
        """
        norms, head_mod, c_emb, c_ln_emb, c_drop, c_blocks, c_ln_f, c_head = cache
        upto = self._trains_upto(norms)  # upto[i]: does anything under block i train?
        L = len(self.blocks)
        below_head = upto[L] or (self.ln_f is not None and bool(norms["ln_f"].trainable()))
        dx = head_mod.backward(dlogits, c_head, need_dx=below_head)
        if not below_head:
            return
        if self.ln_f:
            dx = norms["ln_f"].backward(dx, c_ln_f, need_dx=upto[L])
        for i in reversed(range(L)):
            if not upto[i + 1]:  # nothing in block i or under it trains: stop here
                return
            dx = self.blocks[i].backward(dx, c_blocks[i], need_dx=upto[i])
        if not upto[0]:
            return
        dx = dropout_backward(dx, c_drop)
        if self.ln_emb:
            dx = norms["ln_emb"].backward(dx, c_ln_emb, need_dx=any(p.trainable for p in self.embed.parameters()))
        if dx is not None:
            self.embed.backward(dx, c_emb)

    def _trains_upto(self, norms):
        """upto[i], i = 0..n_layers: does any parameter under block i train (the embeddings and
        blocks 0..i-1, with the active task's adapters and LayerNorms)? upto[n_layers] covers
        every block."""
        def trains(mods):
            return any(p.trainable for m in mods for p in m.parameters())
        s = self.adapters[self.active_adapter] if self.active_adapter else None
        upto = [trains([self.embed] + ([norms["ln_emb"]] if self.ln_emb else []))]
        for i, b in enumerate(self.blocks):
            mods = [b.attn, b.ffn, norms[f"blocks.{i}.ln1"], norms[f"blocks.{i}.ln2"]]
            mods += list(s.blocks[i].values()) if s else []
            upto.append(upto[-1] or trains(mods))
        return upto

    def loss(self, ids, targets, pad_mask=None, head="lm", train=False, rng=None, backward=False,
             ignore_index=-100):
        """Forward and softmax cross-entropy -> (logits, loss); with backward=True also the
        backward, which adds every trainable parameter's gradient to its .grad.

        targets: (B, T) for head "lm" (ignore_index marks positions that do not count),
        (B,) class labels for head "cls".
        """
        logits, cache = self.forward(ids, pad_mask, head, train, rng)
        loss, c_loss = cross_entropy_forward(logits, targets, ignore_index)
        if backward:
            self.backward(cross_entropy_backward(c_loss), cache)
        return logits, loss

    # ------------------------------------------------------------------ reports

    def parameter_groups(self):
        """{group: (total, trainable)} over embeddings, attention, FFN, LayerNorm, adapters, heads."""
        groups = {g: [0, 0] for g in ("embeddings", "attention", "FFN", "LayerNorm", "adapters", "heads")}
        for name, p in self.named_parameters().items():
            g = group_of(name)
            groups[g][0] += p.value.size
            groups[g][1] += p.value.size if p.trainable else 0
        return {g: tuple(v) for g, v in groups.items()}

    def parameter_report(self):
        """A table like the adapter libraries print: total, trainable, % and the group breakdown."""
        total, trainable = self.num_parameters(), self.num_parameters(trainable_only=True)
        lines = [f"{'group':<12}{'total':>12}{'trainable':>12}",
                 *(f"{g:<12}{t:>12,}{tr:>12,}" for g, (t, tr) in self.parameter_groups().items()),
                 f"trainable params: {trainable:,} || all params: {total:,} || "
                 f"trainable%: {100 * trainable / max(total, 1):.4f}"]
        return "\n".join(lines)

    def print_trainable_parameters(self):
        print(self.parameter_report())


def group_of(name):
    """The report group of a dotted parameter name."""
    last = name.rsplit(".", 2)[-2]  # the module's own name: attn, ffn, ln1, head, parallel, ...
    if name.startswith("adapters."):
        if ".head." in name:
            return "heads"
        if last.startswith("ln"):
            return "LayerNorm"
        return "adapters"
    if name.startswith("embed."):
        return "embeddings"
    if last.startswith("ln"):
        return "LayerNorm"
    if "head" in last:
        return "heads"
    return {"attn": "attention", "ffn": "FFN"}[last]
