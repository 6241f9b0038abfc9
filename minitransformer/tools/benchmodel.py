"""The benchmark's model and the work one of its steps does, counted from the shapes.

    BenchConfig, QUICK       the standard sizes, and tiny ones for the tests (--quick)
    step_flops(b, ...)       the matrix-product flops of one training step
    block_products(b)        every product one block makes in a step, as (flops, callable)

bench.py measures; this module only counts, so that a count can be read (and tested) on its own.
"""
from dataclasses import dataclass

import numpy as np

from ..model import ModelConfig


@dataclass
class BenchConfig:
    vocab_size: int = 128  # V
    d_model: int = 256  # C
    n_layers: int = 4
    n_heads: int = 4  # H
    d_ff: int = 1024  # F
    seq_len: int = 128  # T
    batch: int = 16  # B
    bottleneck: int = 64  # m of the adapter step and of the headline latency overhead
    sizes: tuple = (8, 64, 256)  # every m whose inference latency is reported
    lora_rank: int = 8  # r of the LoRA latency (on W_q and W_v, as the paper)
    n_prefix: int = 16  # prefix length of the prefix-tuning latency
    n_prompt: int = 16  # soft-prompt length of the prompt-tuning latency
    repeats: int = 7  # timed repetitions per measurement (after warm-up); the median is kept
    warmup: int = 1  # untimed rounds first: first touches of memory, BLAS thread start-up
    budget_s: float = 60.0  # stop repeating (after 3 repetitions at least) once this much time passed
    step_pairs: int = 30  # adapter step and full step timed back to back this many times: their ratio (bench.step_pairs)
    cpu_repeats: int = 301  # paired repetitions of the one-thread latency overhead (bench.cpu_overhead)
    cpu_rounds: int = 7  # ... in this many rounds, each with its models built afresh; the median round is kept
    dtype: str = "float32"  # what is timed; float64 for the check against PyTorch (torch_twin.py)

    def model_config(self):
        return ModelConfig(vocab_size=self.vocab_size, max_len=self.seq_len, d_model=self.d_model,
                           n_heads=self.n_heads, n_layers=self.n_layers, d_ff=self.d_ff,
                           norm="post", n_classes=2, dtype=self.dtype)


QUICK = BenchConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16, batch=4,
                    bottleneck=8, sizes=(2, 8, 16), lora_rank=2, n_prefix=4, n_prompt=4, repeats=3, warmup=1,
                    step_pairs=4, cpu_repeats=21, cpu_rounds=3)

def step_flops(b, trains="all", train_layernorm=True, adapters=True):
    """Floating-point operations of the matrix products of one training step.

    Counted from the shapes, 2 flops per multiply-add, N = B*T rows. Per block, forward:
      weights    2 N (4 C^2 + 2 C F)      Q, K, V, output projection; FFN up and down
      attention  2 * 2 B T^2 C            Q K^T and P V over all heads (H * hs = C)
      adapters   2 * 2 * 2 N C m          two Houlsby sites, a down and an up projection each
    The backward of every product costs the same again per gradient it produces:
      trains="all"      dx and dW of every weight product, 4 batched products in attention
                        (adapters=False: the bare base, as in full fine-tuning);
      trains="adapters" dx only (frozen weights skip dW), plus the adapters' dx and dW.
                        With the paper's trained LayerNorms the embedding LayerNorm trains, so
                        the gradient must flow through every block down to it; with
                        train_layernorm=False nothing below block 0 trains and its attention
                        backward (4 projections and 2 batched products' backward) is skipped.
    Elementwise work (softmax, GELU, LayerNorm, AdamW) is not counted: it is a few percent
    of the flops but, being memory-bound, a larger share of the time. The classification
    head (C x 2) is negligible and left out.
    """
    N, C, F, T = b.batch * b.seq_len, b.d_model, b.d_ff, b.seq_len
    weights = 2 * N * (4 * C * C + 2 * C * F)
    attn = 2 * 2 * b.batch * T * T * C
    adapter = 2 * (2 * 2 * N * C * b.bottleneck) if adapters or trains == "adapters" else 0
    if trains == "all":
        return b.n_layers * 3 * (weights + attn + adapter)
    per_block = (weights + attn + adapter) + (weights + 2 * attn + 2 * adapter)
    block0_attention_backward = 0 if train_layernorm else 2 * N * 4 * C * C + 2 * attn
    return b.n_layers * per_block - block0_attention_backward


def matmul_shapes(b):
    """(rows, inner, cols) of the model's large weight products: projections, FFN up, FFN down."""
    N, C, F = b.batch * b.seq_len, b.d_model, b.d_ff
    return [(N, C, C), (N, C, F), (N, F, C)]


def block_products(b, seed=0):
    """Every matrix product one block does in a full step, as (flops, fn): random operands of
    the step's shapes and layouts, each product made by the same call the step makes.

    Linear layers (4 attention projections, FFN up and down, each adapter's down and up):
    forward x @ W, backward dout @ W.T and x.T @ dout. Attention: Q K^T and P V forward;
    dP = dctx V^T, dV = P^T dctx, dQ = dS K, dK = dS^T Q backward, with the heads as strided
    views, through kernels_attention.scores_matmul and heads_matmul. n_layers times the sum of the
    flops is step_flops(b) (tests/test_bench.py checks this).
    """
    from ..attention import split_heads
    from .kernels_attention import heads_matmul, scores_matmul
    rng = np.random.default_rng(seed)
    N, C, F, m, B, T, H = (b.batch * b.seq_len, b.d_model, b.d_ff, b.bottleneck, b.batch, b.seq_len,
                           b.n_heads)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    out = []
    for d_in, d_out in [(C, C)] * 4 + [(C, F), (F, C)] + [(C, m), (m, C)] * 2:
        x, W, d = randn(N, d_in), randn(d_in, d_out), randn(N, d_out)
        flops = 2 * N * d_in * d_out
        out += [(flops, lambda x=x, W=W: x @ W), (flops, lambda d=d, W=W: d @ W.T),
                (flops, lambda x=x, d=d: x.T @ d)]
    q, k, v, dctx = (split_heads(randn(B, T, C), H) for _ in range(4))  # (B,H,T,hs) views
    p, ds = randn(B, H, T, T), randn(B, H, T, T)
    flops = 2 * B * T * T * C  # one batched product over every head
    t = (0, 1, 3, 2)
    out += [(flops, lambda: scores_matmul(q, k)), (flops, lambda: heads_matmul(p, v)),
            (flops, lambda: scores_matmul(dctx, v)), (flops, lambda: heads_matmul(p.transpose(t), dctx)),
            (flops, lambda: heads_matmul(ds, k)), (flops, lambda: heads_matmul(ds.transpose(t), q))]
    return out
