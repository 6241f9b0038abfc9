"""The transformer: config, model, heads, named parameters, freezing and tasks.

    ids (B, T) -> embeddings (B, T, C) -> [LN_emb, post-LN only] -> n_layers blocks
        -> [LN_f, pre-LN only] -> heads
      "lm":  per-position logits (B, T, V)   (masked-token or next-token objectives)
      "cls": one logit vector per sequence (B, K), from the active task's head if any

The block is in block.py: post-LN (BERT, the architecture the adapter paper adapted) or pre-LN
(GPT-2), each sub-layer with its residual connection, dropout and adapter slot.

A task is one method of the parameter-efficient family on the shared frozen base (tasks.py).
Before each forward, the active task's modules are put into the base's slots (`_plug`): a
sub-layer's adapter slot, a linear layer or a LayerNorm, an attention's key/value hook, and the
model's own two, `front` (after the embeddings) and `back` (before the heads). The code below
calls whatever the slots hold; an empty slot (None) is skipped.
"""
import fnmatch
from dataclasses import replace

import numpy as np

from . import report, validate
from .adapting import TaskMethods
from .attention import attention_bias
from .backend import ops  # ops.X is layers.X, losses.X, ... (or the fast kernel: backend.py)
from .block import Block
from .configs import ModelConfig  # noqa: F401  (importable from here, as before)
from .heads import ClassifierHead, LMHead
from .modules import Embeddings, LayerNorm
from .validate import integer


# ----------------------------------------------------------------------------- the model


class Transformer(TaskMethods):
    """The model, with named parameters, freezing by name pattern, and named tasks on one shared
    base. Its parts, in the order the forward uses them:

        embed     token embedding W_tok (V, C) + position embedding W_pos (T_max, C)
        front     a slot for a task's module before the blocks (None for the bare base)
        ln_emb    LayerNorm of the embeddings (post-LN only, as in BERT)
        blocks    n_layers Blocks: attn, ln1, ffn, ln2 (block.py)
        ln_f      final LayerNorm (pre-LN only, as in GPT-2)
        back      a slot for a task's module before the heads (None for the bare base)
        lm_head   per-position logits over the vocabulary (head="lm")
        cls_head  the base's own classifier (head="cls" with no task active; None until
                  add_classifier or config.n_classes)
        adapters  {task name: Task} (tasks.py): one method's parts and a head each
    active_parameters(head) lists exactly the parameters a forward uses.
    """

    def __init__(self, config, seed=0):
        integer("seed", seed, least=0, expected="a non-negative integer")
        self.config = cfg = config
        self.dtype = np.dtype(cfg.dtype)
        rng = np.random.default_rng(seed)
        C, dt, std = cfg.d_model, self.dtype, cfg.init_std
        self.embed = Embeddings("embed", cfg.vocab_size, cfg.max_len, C, rng, dt, std)
        # BERT normalises the embeddings (post-LN); GPT-2 normalises the last block's output (pre-LN)
        self.ln_emb = LayerNorm("ln_emb", C, dt, cfg.ln_eps) if cfg.norm == "post" else None
        self.blocks = [Block(i, cfg, rng, dt) for i in range(cfg.n_layers)]
        self.ln_f = LayerNorm("ln_f", C, dt, cfg.ln_eps) if cfg.norm == "pre" else None
        self.front = self.back = None  # slots a task may fill (tasks.py), empty for the base
        self.lm_head = LMHead("lm_head", C, cfg.vocab_size, rng, dt, std)
        self.cls_head = None
        self._modules = self._base_modules()  # fixed: the slots may hold a task's modules later
        if cfg.n_classes:
            self.add_classifier(cfg.n_classes, seed=seed + 1)
        self.adapters = {}  # task name -> Task
        self.active_adapter = None

    # ------------------------------------------------------------------ parameters

    def _base_modules(self):
        mods = {"embed": self.embed, "ln_emb": self.ln_emb}
        for i, b in enumerate(self.blocks):
            mods.update({f"blocks.{i}.{k}": getattr(b, k) for k in ("attn", "ln1", "ffn", "ln2")})
        mods.update(ln_f=self.ln_f, lm_head=self.lm_head, cls_head=self.cls_head)
        return {path: m for path, m in mods.items() if m is not None}

    def named_modules(self):
        """{path: module} of the base (embed, ln_emb, blocks.0.attn, ..., lm_head, cls_head)."""
        return dict(self._modules)

    def norms(self):
        """The base's LayerNorms by path: {"ln_emb" or "ln_f", "blocks.0.ln1", ...}."""
        return {path: m for path, m in self._modules.items() if isinstance(m, LayerNorm)}

    def named_parameters(self):
        """{dotted name: Parameter} for the base and every task, in a fixed order."""
        params = [p for m in self._modules.values() for p in m.p.values()]
        params += [p for task in self.adapters.values() for p in task.parameters()]
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
        self._modules = self._base_modules()
        return self.cls_head

    def parameter_groups(self):
        return report.parameter_groups(self)

    def parameter_report(self):
        return report.parameter_report(self)

    def print_trainable_parameters(self):
        print(report.parameter_report(self))

    # ------------------------------------------------------------------ forward and backward

    def forward(self, ids, pad_mask=None, head="lm", train=False, rng=None):
        """ids (B, T) ints, pad_mask (B, T) bool (True = real token) -> logits, cache.

        head "lm" -> (B, T, V); head "cls" -> (B, K) from the active task's head, or from the
        base's cls_head when no task is active. train=True turns dropout on, drawing its masks
        from `rng` (a np.random.Generator).

        What a task puts into the slots may change T on the way: a module in `front` may put
        positions before the tokens (T' = n + T), and the one in `back` takes them off again, so
        the heads always see the T real tokens.
        """
        task = self._active()
        validate.model_inputs(self.config, ids, pad_mask, task.config if task else None, self.dtype)
        c = {"task": task}  # the cache: every step's, by name
        pieces, c["pieces"] = task.precompute() if task else (None, None)  # what the task computes first (tasks.py)
        self._plug(task.plugs(self, pieces) if task else {})  # the task's modules in, for this forward
        try:
            return self._forward(ids, pad_mask, head, train, rng, task, c)
        finally:
            self._plug({})  # the bare base between passes; each cache holds the modules it used

    def _forward(self, ids, pad_mask, head, train, rng, task, c):
        cfg = self.config
        x, c["embed"] = self.embed.forward(ids)  # (B,T,C), token + position
        mask = pad_mask
        c["front"] = self.front
        if self.front:
            x, mask, c["front_cache"] = self.front.forward(x, mask)  # (B,T',C), mask None or (B,T')
        c["ln_emb"] = self.ln_emb
        if self.ln_emb:
            x, c["ln_emb_cache"] = self.ln_emb.forward(x)  # post-LN (BERT) normalises the embeddings
        x, c["drop"] = ops.dropout_forward(x, cfg.dropout, rng, train)
        bias = attention_bias(x.shape[1], cfg.causal, mask, self.dtype)  # None or (B|1,1,T',T')
        c["blocks"] = []
        for block in self.blocks:
            x, c_block = block.forward(x, bias, train, rng)  # (B,T',C)
            c["blocks"].append(c_block)
        c["ln_f"] = self.ln_f
        if self.ln_f:
            x, c["ln_f_cache"] = self.ln_f.forward(x)  # pre-LN (GPT-2) normalises the last output
        c["back"] = self.back
        if self.back:
            x, c["back_cache"] = self.back.forward(x)  # (B,T,C)
        c["head"] = head_mod = self._head(head, task)
        logits, c["head_cache"] = head_mod.forward(x, pad_mask)  # (B,T,V) or (B,K)
        return logits, c

    def _head(self, head, task):
        if head == "lm":
            return self.lm_head
        if head != "cls":
            raise ValueError(f"head: expected 'lm' or 'cls', got {head!r}")
        if task is not None:
            return task.head
        if self.cls_head is None:
            raise ValueError("head: 'cls' needs an active adapter or a base classifier "
                             "(model.add_classifier(n_classes)), got neither")
        return self.cls_head

    def backward(self, dlogits, cache):
        """Add the gradient of every trainable parameter to its .grad; frozen ones get none.

        The forward in reverse, going down only as far as something still trains:
        below[i] says whether any parameter under block i trains (the embeddings, the front slot,
        ln_emb, and blocks 0..i-1 with what the task put into them); below[n_layers] covers
        every block. Block i is visited only when below[i + 1], and passes dx down only when
        below[i]: head-only training stops at the head, and block 0 under a frozen base and
        its embeddings skips its input gradient.
        """
        if not isinstance(cache, dict) or "blocks" not in cache:
            raise ValueError(f"cache: expected the cache forward returned (logits, cache = "
                             f"model.forward(...)), got {type(cache).__name__}")
        c, task, n_layers = cache, cache["task"], len(self.blocks)
        below = self._trains_below(c)
        ln_f = c["ln_f"]
        dx = c["head"].backward(dlogits, c["head_cache"], need_dx=below[n_layers] or bool(ln_f and ln_f.trains()))
        if dx is None:
            return
        if c["back"]:
            dx = c["back"].backward(dx, c["back_cache"])  # (B,T',C)
        if ln_f:
            dx = ln_f.backward(dx, c["ln_f_cache"], need_dx=below[n_layers])
        for i in reversed(range(n_layers)):
            if not below[i + 1]:  # nothing in block i or under it trains: stop here
                break
            dx = self.blocks[i].backward(dx, c["blocks"][i], need_dx=below[i])
        if task is not None:
            task.precompute_backward(c["pieces"])  # what the task computed before the forward
        if not below[0]:
            return
        dx, _ = ops.dropout_backward(dx, c["drop"])
        embed_trains, front = self.embed.trains(), c["front"]
        if c["ln_emb"]:
            dx = c["ln_emb"].backward(dx, c["ln_emb_cache"], need_dx=embed_trains or bool(front and front.trains()))
        if front and dx is not None:
            dx = front.backward(dx, c["front_cache"], need_dx=embed_trains)  # (B,T,C)
        if dx is not None:
            self.embed.backward(dx, c["embed"])

    def _trains_below(self, c):
        """below[i], i = 0..n_layers: does any parameter under block i train? (backward's doc)"""
        first = [m for m in (self.embed, c["front"], c["ln_emb"]) if m]
        below = [any(m.trains() for m in first)]
        for c_block in c["blocks"]:
            below.append(below[-1] or any(m.trains() for m in Block.used(c_block)))
        return below

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
            dlogits, _ = ops.cross_entropy_backward(c_loss)  # (B,T,V) or (B,K)
            self.backward(dlogits, cache)
        return logits, loss
