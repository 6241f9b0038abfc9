"""The transformer block, built from two residual sub-layers (the Annotated Transformer's
SublayerConnection), with the norm order chosen once:

    post-LN (BERT, the adapter paper):  y = LN(x + adapter(dropout(f(x))))
    pre-LN  (GPT-2):                    y = x + adapter(dropout(f(LN(x))))

f is the attention in the first sub-layer and the feed-forward in the second. `adapter` is an
empty slot (the identity) until a task puts a bottleneck adapter there, on the sub-layer's
output before the residual add, as in Houlsby et al.; `parallel` is the slot of He et al.'s
branch, fed with f's input and added to f's output. `norm` is the block's LayerNorm, or a
task's own copy of it.
"""
from .backend import ops
from .modules import Attention, FeedForward, LayerNorm


class PostNorm:
    """y = LN(x + adapter(dropout(f(x)))): BERT normalises after the residual add."""

    def __init__(self, f, norm, dropout):
        self.f, self.norm, self.dropout = f, norm, dropout
        self.adapter = self.parallel = None  # slots

    def used(self):
        """The modules the next forward will use (and its backward send gradients to)."""
        return (self.f, self.norm, self.adapter, self.parallel)

    def branch_forward(self, u, train, rng, *args):
        """adapter(dropout(f(u))) (+ parallel(u)): the sub-layer's output before the residual."""
        f, norm, adapter, parallel = used = self.used()
        y, cache_f = f.forward(u, *args)  # (B,T,C)
        y, cache_d = ops.dropout_forward(y, self.dropout, rng, train)
        cache_a = cache_p = None
        if adapter is not None:  # the paper: on the sub-layer's output, before the residual add
            y, cache_a = adapter.forward(y)
        if parallel is not None:  # He et al.: a branch beside f, same input, outputs add
            branch, cache_p = parallel.forward(u)
            y = y + branch
        return y, (used, cache_f, cache_d, cache_a, cache_p)

    def branch_backward(self, dy, cache, need_du):
        (f, norm, adapter, parallel), cache_f, cache_d, cache_a, cache_p = cache
        du = None
        if parallel is not None:  # forward was y += parallel(u)
            du = parallel.backward(dy, cache_p)
        if adapter is not None:
            dy = adapter.backward(dy, cache_a)
        dy, _ = ops.dropout_backward(dy, cache_d)
        duf = f.backward(dy, cache_f, need_dx=need_du)
        return duf if du is None else du + duf  # u fed f and the parallel branch

    def forward(self, x, train=False, rng=None, *args):
        y, cache_b = self.branch_forward(x, train, rng, *args)
        out, cache_n = self.norm.forward(x + y)  # (B,T,C), the residual, then the norm
        return out, (cache_b, cache_n)

    def backward(self, dout, cache, need_dx=True):
        cache_b, cache_n = cache
        f, norm, adapter, parallel = cache_b[0]  # the modules the forward used
        dh = norm.backward(dout, cache_n)  # forward was out = LN(x + y)
        if not need_dx:
            self.branch_backward(dh, cache_b, need_du=False)
            return None
        return dh + self.branch_backward(dh, cache_b, need_du=True)  # x fed the residual and f


class PreNorm(PostNorm):
    """y = x + adapter(dropout(f(LN(x)))): GPT-2 normalises the sub-layer's input."""

    def forward(self, x, train=False, rng=None, *args):
        u, cache_n = self.norm.forward(x)  # (B,T,C)
        y, cache_b = self.branch_forward(u, train, rng, *args)
        return x + y, (cache_b, cache_n)  # the residual

    def backward(self, dout, cache, need_dx=True):
        cache_b, cache_n = cache
        f, norm, adapter, parallel = cache_b[0]  # the modules the forward used
        trains_norm = norm.trains()  # LN may train even when dx is not wanted
        du = self.branch_backward(dout, cache_b, need_du=need_dx or trains_norm)
        if du is None:
            return None
        dn = norm.backward(du, cache_n, need_dx=need_dx)  # forward was u = LN(x)
        return dout + dn if need_dx else None  # x fed the residual and the norm


class Block:
    """attention sub-layer, then feed-forward sub-layer (post-LN or pre-LN, chosen here once)."""

    def __init__(self, i, cfg, rng, dtype):
        C, std = cfg.d_model, cfg.init_std
        self.attn = Attention(f"blocks.{i}.attn", C, cfg.n_heads, rng, dtype, std)
        self.ln1 = LayerNorm(f"blocks.{i}.ln1", C, dtype, cfg.ln_eps)
        self.ffn = FeedForward(f"blocks.{i}.ffn", C, cfg.d_ff, rng, dtype, std)
        self.ln2 = LayerNorm(f"blocks.{i}.ln2", C, dtype, cfg.ln_eps)
        Sublayer = PostNorm if cfg.norm == "post" else PreNorm
        self.sub1 = Sublayer(self.attn, self.ln1, cfg.dropout)
        self.sub2 = Sublayer(self.ffn, self.ln2, cfg.dropout)

    def modules(self):
        return [self.attn, self.ln1, self.ffn, self.ln2]

    def forward(self, x, bias=None, train=False, rng=None):
        """x (B, T, C), bias the attention mask -> out (B, T, C), cache."""
        h, cache_1 = self.sub1.forward(x, train, rng, bias)
        out, cache_2 = self.sub2.forward(h, train, rng)
        return out, (cache_1, cache_2)

    def backward(self, dout, cache, need_dx=True):
        """dout (B, T, C) -> dx (B, T, C), or None when nothing below needs it."""
        cache_1, cache_2 = cache
        dh = self.sub2.backward(dout, cache_2)
        return self.sub1.backward(dh, cache_1, need_dx=need_dx)

    @staticmethod
    def used(cache):
        """The modules a forward of this block used, from its cache: each sub-layer's norm,
        adapter and parallel branch, and the linear layers (and hook) inside its f."""
        used = []
        for (((f, *rest), cache_f, *_), _) in cache:
            used += [m for m in (*rest, *cache_f[0]) if m is not None]
        return used
