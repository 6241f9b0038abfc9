"""The transformer: config, block, model, heads, named parameters, freezing and tasks.

    ids (B, T) -> embeddings (B, T, C) -> [LN_emb, post-LN only] -> n_layers blocks
        -> [LN_f, pre-LN only] -> heads
      "lm":  per-position logits (B, T, V)   (masked-token or next-token objectives)
      "cls": one logit vector per sequence (B, K), from the active adapter's head if any

Post-LN block (BERT, the architecture the adapter paper adapted):
    x = LN1(x + Adapter_attn(Attn(x)));  x = LN2(x + Adapter_ffn(FFN(x)))
Pre-LN block (GPT-2): x = x + Adapter_attn(Attn(LN1(x)));  x = x + Adapter_ffn(FFN(LN2(x)))
Every part is named in Transformer's docstring; dropout follows the embeddings and each
sub-layer's output projection.

A task is one method of the parameter-efficient family on the shared frozen base (tasks.py):
bottleneck adapters, LoRA branches (peft.py; merge/unmerge fold them into W), a prefix in every
attention, a soft prompt in front of the input, or BitFit's own copies of the biases.
"""
import fnmatch
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import sizes
from .adapters import AdapterConfig
from .attention import attention_bias
from .backend import ops  # ops.X is layers.X, losses.X, ... (or the fast kernel: backend.py)
from .modules import Attention, ClassifierHead, Embeddings, FeedForward, LayerNorm, LMHead
from .peft import lora_merge
from .tasks import BASE_GROUPS, GROUPS, LORA_WEIGHT, AdapterSet, BlockParts, group_of, method_of  # noqa: F401  (AdapterSet:
#                                                    checkpoint.py and others import it from here)
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

    def forward(self, x, bias, parts=None, train=False, rng=None):
        """x (B, T, C) -> out (B, T, C), cache. parts: what the active task adds to this block
        (tasks.BlockParts: adapters, its own copies of LayerNorm or bias parameters, LoRA
        branches, a prefix), or None for the bare base."""
        parts = BlockParts() if parts is None else parts
        adapters, own = parts.adapters, parts.own
        c = {"parts": parts}  # the cache: every step's, by name
        # --- attention sub-layer
        a_in = x
        if self.pre:
            a_in, c["ln1_pre"] = self.ln1.forward(x, own.get("ln1"))  # GPT-2 normalises the sub-layer's input
        a, c["attn"] = self.attn.forward(a_in, bias, own.get("attn"), parts.lora, parts.prefix)  # (B,T,C)
        a, c["drop1"] = ops.dropout_forward(a, self.dropout, rng, train)
        if "attn" in adapters:  # the paper: on the sub-layer's output, before the residual add
            a, c["adapter_attn"] = adapters["attn"].forward(a)
        h = x + a  # (B,T,C), the residual
        if not self.pre:
            h, c["ln1_post"] = self.ln1.forward(h, own.get("ln1"))  # BERT normalises after the residual add
        # --- feed-forward sub-layer
        f_in = h
        if self.pre:
            f_in, c["ln2_pre"] = self.ln2.forward(h, own.get("ln2"))
        f, c["ffn"] = self.ffn.forward(f_in, own.get("ffn"), parts.lora)  # (B,T,C)
        f, c["drop2"] = ops.dropout_forward(f, self.dropout, rng, train)
        if "ffn" in adapters:
            f, c["adapter_ffn"] = adapters["ffn"].forward(f)
        if "parallel" in adapters:  # He et al.: a branch beside the FFN, same input, outputs add
            branch, c["parallel"] = adapters["parallel"].forward(f_in)
            f = f + branch
        out = h + f  # (B,T,C), the residual
        if not self.pre:
            out, c["ln2_post"] = self.ln2.forward(out, own.get("ln2"))
        return out, c

    def backward(self, dout, c, need_dx=True):
        """dout (B, T, C) -> dx (B, T, C), or None when nothing below needs it."""
        parts = c["parts"]
        adapters, own, lora, prefix = parts.adapters, parts.own, parts.lora, parts.prefix
        own_ln1, own_ln2 = own.get("ln1"), own.get("ln2")
        # --- feed-forward sub-layer, in reverse
        dres = dout
        if not self.pre:
            dres = self.ln2.backward(dout, c["ln2_post"], own=own_ln2)  # forward was out = LN2(h + f)
        df = dres  # forward was out = h + f: both branches get the same gradient
        df_in = None
        if "parallel" in adapters:
            df_in = adapters["parallel"].backward(df, c["parallel"])  # forward was f += branch(f_in)
        if "ffn" in adapters:
            df = adapters["ffn"].backward(df, c["adapter_ffn"])
        df = ops.dropout_backward(df, c["drop2"])
        dffn_in = self.ffn.backward(df, c["ffn"], own=own.get("ffn"), lora=lora)
        df_in = dffn_in if df_in is None else df_in + dffn_in  # f_in fed the FFN and the branch
        if self.pre:  # forward was f_in = LN2(h), and h also went straight to the output
            dh = dres + self.ln2.backward(df_in, c["ln2_pre"], own=own_ln2)
        else:  # forward was f_in = h, which also went straight to the residual
            dh = dres + df_in
        # --- attention sub-layer, in reverse
        if not self.pre:
            dh = self.ln1.backward(dh, c["ln1_post"], own=own_ln1)  # forward was h = LN1(x + a)
        da = dh  # forward was h = x + a
        if "attn" in adapters:
            da = adapters["attn"].backward(da, c["adapter_attn"])
        da = ops.dropout_backward(da, c["drop1"])
        attn = dict(own=own.get("attn"), lora=lora, prefix=prefix)
        if self.pre:  # forward was a_in = LN1(x): LN1 may train even when dx is not wanted
            da_in = self.attn.backward(da, c["attn"], need_dx=need_dx or bool(self.ln1.trainable(own_ln1)),
                                       **attn)
            if da_in is not None:
                da_in = self.ln1.backward(da_in, c["ln1_pre"], need_dx=need_dx, own=own_ln1)
            return dh + da_in if need_dx else None
        da_in = self.attn.backward(da, c["attn"], need_dx=need_dx, **attn)  # skips dx when not wanted
        return dh + da_in if need_dx else None  # x fed both the attention and the residual


# ----------------------------------------------------------------------------- the model


class Transformer:
    """The model, with named parameters, freezing by name pattern, and named per-task adapters
    on one shared base. Its parts, in the order the forward uses them:

        embed     token embedding W_tok (V, C) + position embedding W_pos (T_max, C)
        ln_emb    LayerNorm of the embeddings (post-LN only, as in BERT)
        blocks    n_layers Blocks: attn, ln1, ffn, ln2 (+ the active task's adapters)
        ln_f      final LayerNorm (pre-LN only, as in GPT-2)
        lm_head   per-position logits over the vocabulary (head="lm")
        cls_head  the base's own classifier (head="cls" with no adapter active; None until
                  add_classifier or config.n_classes)
        adapters  {task: AdapterSet} (tasks.py): one method's parts (bottleneck adapters,
                  LoRA, a prefix, a prompt), the task's own copies of base parameters
                  (LayerNorms, BitFit's biases) used in place of the base's, and a head
    active_parameters(head) lists exactly the parameters a forward uses.
    """

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
        """Add a named task (one per task, with its own classification head): bottleneck adapters
        (AdapterConfig, the default), LoRAConfig, PrefixConfig, PromptConfig or BitFitConfig."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: expected an identifier like 'sentiment', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"name: an adapter called {name!r} exists already")
        config = AdapterConfig() if config is None else config
        method = method_of(config)  # a TypeError naming the configs there are, for anything else
        integer("n_classes", n_classes, least=2)
        integer("seed", seed, least=0)
        n = sizes.adapter_parameter_count(self.config, config, n_classes)
        sizes.check_fits(n * self.dtype.itemsize, f"config: the {method} task ({n:,} parameters)")
        self.adapters[name] = AdapterSet(name, config, n_classes, self, np.random.default_rng(seed))
        return self.adapters[name]

    def delete_adapter(self, name):
        if self.get_adapter(name).merged:
            raise ValueError(f"name: {name!r} is merged into the base weights; unmerge({name!r}) first")
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
        merged = [n for n, s in self.adapters.items() if s.merged and n != name]
        if merged:  # the base weights hold that task's update now
            raise ValueError(f"name: task {merged[0]!r} is merged into the base weights; "
                             f"unmerge({merged[0]!r}) before activating {name!r}")
        self.active_adapter = name

    def train_adapter(self, name):
        """Activate adapter `name` and freeze everything else: what trains is its adapters,
        its head and, in the paper's setting (train_layernorm=True), its own LayerNorms
        (or its LoRA matrices, prefix, prompt or bias copies, by method)."""
        if self.get_adapter(name).merged:
            raise ValueError(f"name: {name!r} is merged (its branches are not computed); "
                             f"unmerge({name!r}) before training it")
        self.set_active_adapter(name)
        self.freeze()
        self.unfreeze(f"adapters.{name}.*")

    def merge(self, name):
        """Fold LoRA task `name` into the base weights, W <- W + s A B (peft.lora_merge), and
        activate it: the forward then runs no branch, at exactly the bare base's cost.

        The original arrays are kept, and unmerge(name) puts them back: the base returns bit for
        bit. (W + s A B - s A B would not: each floating-point addition rounds.) While merged,
        the base weights are this task's: activating another task, training, deleting or saving
        the base wait for unmerge.
        """
        s = self.get_adapter(name)
        if s.method != "lora":
            raise ValueError(f"name: expected a LoRA task to merge, got {name!r} (method {s.method!r})")
        if s.merged:
            raise ValueError(f"name: {name!r} is merged already")
        self.set_active_adapter(name)
        for i, (block, lora) in enumerate(zip(self.blocks, s.lora)):
            for t in lora.targets:
                module, local = LORA_WEIGHT[t]
                W = getattr(block, module).p[local]
                s.merged[(i, t)] = W.value  # the original array itself: nothing writes into it
                W.value = lora_merge(W.value, lora.p[f"A_{t}"].value, lora.p[f"B_{t}"].value, lora.scale)

    def unmerge(self, name):
        """Put back the base weights merge(name) replaced: the very arrays, bit for bit."""
        s = self.get_adapter(name)
        if not s.merged:
            raise ValueError(f"name: {name!r} is not merged")
        for (i, t), original in s.merged.items():
            module, local = LORA_WEIGHT[t]
            getattr(self.blocks[i], module).p[local].value = original
        s.merged = {}

    def drop_prefix_mlp(self, name):
        """Keep prefix task `name`'s computed prefix and drop its reparameterising MLP (tasks.py)."""
        self.get_adapter(name).drop_prefix_mlp()

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

    def _active(self):
        """The active task's AdapterSet, or None for the bare base."""
        return self.adapters[self.active_adapter] if self.active_adapter else None

    def _base_paths(self):
        """{path: module} of the base modules a task may hold its own copies for."""
        mods = {"embed": self.embed, **self.norms()}
        mods.update({f"blocks.{i}.{k}": getattr(b, k) for i, b in enumerate(self.blocks) for k in ("attn", "ffn")})
        return mods

    def active_parameters(self, head="lm"):
        """{name: Parameter} of exactly what forward(..., head) uses with the active adapter:
        the base's embeddings and blocks, with the active task's own copies in place of the
        base's (LayerNorms, BitFit's biases), its adapters, LoRA branches (not while merged),
        prefix or prompt, and the head `head` selects."""
        s = self._active()
        own = s.own if s else {}
        used = [p for path, m in self._base_paths().items() for p in m.params(own.get(path)).values()]
        if s:
            parts = [m for m in s.modules()[:-1] if not (s.merged and m in s.lora)]
            used += [p for m in parts for p in m.parameters()]
        used += self._head(head, s).parameters()
        names = {p.name for p in used}
        return {n: p for n, p in self.named_parameters().items() if n in names}

    def forward(self, ids, pad_mask=None, head="lm", train=False, rng=None):
        """ids (B, T) ints, pad_mask (B, T) bool (True = real token) -> logits, cache.

        head "lm" -> (B, T, V); head "cls" -> (B, K) from the active adapter's head, or from
        the base's cls_head when no adapter is active. train=True turns dropout on, drawing its
        masks from `rng` (a np.random.Generator).

        A prompt-tuning task puts its n soft-prompt embeddings in front of the embedded tokens
        (real positions for the masks; no position embedding); the heads see only the T real
        tokens: "lm" gives (B, T, V) for them, "cls" pools the first real token ([CLS]) or the
        mean over the real tokens. A prefix-tuning task's n keys and values join every attention.
        """
        self._check_inputs(ids, pad_mask)
        cfg = self.config
        s = self._active()
        own = s.own if s else {}
        c = {"task": s}  # the cache: every step's, by name
        x, c["embed"] = self.embed.forward(ids)  # (B,T,C), token + position
        n, mask = (s.n_prompt() if s else 0), pad_mask
        if n:  # prompt tuning: the soft prompt in front of the embedded tokens
            x, c["prompt"] = s.prompt.forward(x)  # (B,n+T,C)
            if pad_mask is not None:  # the prompt is never padding
                mask = np.concatenate([np.ones((ids.shape[0], n), bool), pad_mask], axis=1)  # (B,n+T)
        if self.ln_emb:
            x, c["ln_emb"] = self.ln_emb.forward(x, own.get("ln_emb"))  # post-LN (BERT) normalises the embeddings
        x, c["drop"] = ops.dropout_forward(x, cfg.dropout, rng, train)
        prefixes, c["prefixes"] = s.prefixes() if s else (None, None)  # per block (P_k, P_v), or None
        bias = attention_bias(n + ids.shape[1], cfg.causal, mask, self.dtype,
                              s.n_prefix() if s else 0)  # None or (B|1,1,n+T,n_prefix+n+T)
        c["blocks"] = []
        for i, block in enumerate(self.blocks):
            x, c_block = block.forward(x, bias, s.block_parts(i, prefixes) if s else None, train, rng)
            c["blocks"].append(c_block)  # x (B,n+T,C)
        if self.ln_f:
            x, c["ln_f"] = self.ln_f.forward(x, own.get("ln_f"))  # pre-LN (GPT-2) normalises the last output
        if n:
            x, c["strip"] = ops.strip_prompt_forward(x, n)  # (B,T,C): the heads see the real tokens only
        c["head"] = head_mod = self._head(head, s)
        logits, c["head_cache"] = head_mod.forward(x, pad_mask)  # (B,T,V) or (B,K)
        return logits, c

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
        """Add the gradient of every trainable parameter to its .grad; frozen ones get none.

        Gradients flow down only as far as something still trains: a block whose input
        gradient nobody below needs skips that product (block 0 under a frozen base and its
        embeddings), and blocks with nothing trainable in or under them are not visited at
        all (head-only training stops at the head).
        """
        c = cache
        s = c["task"]
        own = s.own if s else {}
        upto = self._trains_upto(c)  # upto[i]: does anything under block i train?
        L = len(self.blocks)
        below_head = upto[L] or (self.ln_f is not None and bool(self.ln_f.trainable(own.get("ln_f"))))
        dx = c["head"].backward(dlogits, c["head_cache"], need_dx=below_head)
        if not below_head:
            return
        if "strip" in c:
            dx = ops.strip_prompt_backward(dx, c["strip"])  # (B,n+T,C): zero at the prompt
        if self.ln_f:
            dx = self.ln_f.backward(dx, c["ln_f"], need_dx=upto[L], own=own.get("ln_f"))
        for i in reversed(range(L)):
            if not upto[i + 1]:  # nothing in block i or under it trains: stop here
                break
            dx = self.blocks[i].backward(dx, c["blocks"][i], need_dx=upto[i])
        if s is not None:
            s.prefix_backward(c["prefixes"])  # every block's dP_k, dP_v on through the prefix MLP
        if not upto[0]:
            return
        dx = ops.dropout_backward(dx, c["drop"])
        embed_trains = any(p.trainable for p in self.embed.parameters())
        prompt_trains = "prompt" in c and bool(s.prompt.trainable())
        if self.ln_emb:
            dx = self.ln_emb.backward(dx, c["ln_emb"], need_dx=embed_trains or prompt_trains,
                                      own=own.get("ln_emb"))
        if "prompt" in c and dx is not None:  # forward was x = [P; x]
            dx = s.prompt.backward(dx, c["prompt"], need_dx=embed_trains)
        if dx is not None:
            self.embed.backward(dx, c["embed"])

    def _trains_upto(self, c):
        """upto[i], i = 0..n_layers: does any parameter under block i train (the embeddings,
        the prompt and ln_emb, and blocks 0..i-1 with what the forward's task added to them)?
        upto[n_layers] covers every block."""
        s = c["task"]
        own = s.own if s else {}

        def trains(params):
            return any(p.trainable for p in params)
        first = self.embed.parameters() + (s.prompt.parameters() if s and s.prompt else [])
        first += list(self.ln_emb.params(own.get("ln_emb")).values()) if self.ln_emb else []
        upto = [trains(first)]
        for b, c_block in zip(self.blocks, c["blocks"]):
            parts = c_block["parts"]
            params = [p for k in ("attn", "ffn", "ln1", "ln2") for p in getattr(b, k).params(parts.own.get(k)).values()]
            upto.append(upto[-1] or trains(params + parts.parameters()))
        return upto

    def loss(self, ids, targets, pad_mask=None, head="lm", train=False, rng=None, backward=False,
             ignore_index=-100):
        """Forward and softmax cross-entropy -> (logits, loss); with backward=True also the
        backward, which adds every trainable parameter's gradient to its .grad.

        targets: (B, T) for head "lm" (ignore_index marks positions that do not count),
        (B,) class labels for head "cls".
        """
        logits, cache = self.forward(ids, pad_mask, head, train, rng)
        loss, c_loss = ops.cross_entropy_forward(logits, targets, ignore_index)
        if backward:
            self.backward(ops.cross_entropy_backward(c_loss), cache)
        return logits, loss

    # ------------------------------------------------------------------ reports

    def parameter_groups(self):
        """{group: (total, trainable)} over embeddings, attention, FFN, LayerNorm, adapters, heads,
        and the groups of the other methods (LoRA, prefix, prompt, biases) where the model has any."""
        groups = {g: [0, 0] for g in GROUPS}
        for name, p in self.named_parameters().items():
            g = group_of(name)
            groups[g][0] += p.value.size
            groups[g][1] += p.value.size if p.trainable else 0
        return {g: tuple(v) for g, v in groups.items() if g in BASE_GROUPS or v[0]}

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
