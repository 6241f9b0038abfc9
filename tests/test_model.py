"""Containers, the block and the whole model: gradient checks in float64 (containers at
OP_THRESHOLD = 1e-7, the model's loss at MODEL_THRESHOLD = 1e-6), masks, determinism, the
gradcheck command."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import batch, generic_model, small_config

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.attention import attention_bias
from minitransformer.gradcheck import MODEL_THRESHOLD, OP_THRESHOLD, check_model, check_module
from minitransformer.block import Block
from minitransformer.heads import ClassifierHead, LMHead
from minitransformer.modules import Adapter, Attention, FeedForward, LayerNorm, plug

ROOT = Path(__file__).resolve().parents[1]
F64 = np.float64


def assert_module_ok(module, errors):
    """Every trainable parameter and the input were checked, each error <= OP_THRESHOLD (1e-7)."""
    assert set(errors) == {"x"} | {p.name for p in module.parameters() if p.trainable}
    assert max(errors.values()) <= OP_THRESHOLD, errors


def moved_layernorm(prefix, C, rng):
    ln = LayerNorm(prefix, C, F64)
    ln.p["gamma"].value += 0.3 * rng.standard_normal(C)
    ln.p["beta"].value += 0.3 * rng.standard_normal(C)
    return ln


# ----------------------------------------------------------------------------- containers


def test_check_module_layernorm(rng):
    ln = moved_layernorm("ln", 6, rng)
    x = rng.standard_normal((2, 3, 6))
    assert_module_ok(ln, check_module(ln, x))


@pytest.mark.parametrize("causal", [False, True])
def test_check_module_attention_masks(causal, rng):
    attn = Attention("attn", 6, 2, rng, F64, std=0.5)
    pad = np.array([[True] * 4, [True, True, False, False]])
    bias = attention_bias(4, causal, pad, F64)
    assert_module_ok(attn, check_module(attn, rng.standard_normal((2, 4, 6)), bias=bias))


def test_check_module_feedforward(rng):
    ffn = FeedForward("ffn", 6, 12, rng, F64, std=0.5)
    assert_module_ok(ffn, check_module(ffn, rng.standard_normal((2, 3, 6))))


@pytest.mark.parametrize("nonlinearity, skip, scaling", [("gelu", True, 1.0), ("relu", True, 1.0),
                                                         ("tanh", True, 2.0), ("gelu", False, 4.0)])
def test_check_module_adapter(nonlinearity, skip, scaling, rng):
    cfg = AdapterConfig(bottleneck=3, init_std=0.5, nonlinearity=nonlinearity, scaling=scaling)
    adapter = Adapter("ad", 6, cfg, rng, F64, skip=skip)
    adapter.p["b_down"].value += rng.standard_normal(3)  # biases off zero too
    x = rng.standard_normal((2, 3, 6))
    x[np.abs(x) < 0.05] = 0.5
    assert_module_ok(adapter, check_module(adapter, x))


def test_check_module_lm_head(rng):
    head = LMHead("lm_head", 6, 7, rng, F64, std=0.5)
    assert_module_ok(head, check_module(head, rng.standard_normal((2, 3, 6))))


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_check_module_classifier_head(pooling, rng):
    head = ClassifierHead("cls", 6, 3, pooling, rng, F64, std=0.5)
    pad = np.array([[True] * 4, [True, True, False, False]])
    assert_module_ok(head, check_module(head, rng.standard_normal((2, 4, 6)), pad_mask=pad))


@pytest.mark.parametrize("make", ["ln", "attn", "ffn", "adapter", "parallel", "lm_head", "cls_mean",
                                  "block_post", "block_pre"])
def test_container_backward_never_writes_into_dout(make, rng):
    """STYLE.md rule 5, for every container: the caller's upstream gradient stays as it was."""
    C = 6
    acfg = AdapterConfig(bottleneck=3, init_std=0.5)
    module = {"ln": lambda: moved_layernorm("ln", C, rng),
              "attn": lambda: Attention("attn", C, 2, rng, F64, std=0.5),
              "ffn": lambda: FeedForward("ffn", C, 12, rng, F64, std=0.5),
              "adapter": lambda: Adapter("ad", C, acfg, rng, F64),
              "parallel": lambda: Adapter("ad", C, acfg, rng, F64, skip=False),
              "lm_head": lambda: LMHead("lm_head", C, 7, rng, F64, std=0.5),
              "cls_mean": lambda: ClassifierHead("cls", C, 3, "mean", rng, F64, std=0.5),
              "block_post": lambda: BlockUnderTest(Block(0, small_config(d_model=C), rng, F64),
                                                   {"attn": Adapter("a", C, acfg, rng, F64),
                                                    "ffn": Adapter("f", C, acfg, rng, F64)}, 0),
              "block_pre": lambda: BlockUnderTest(Block(0, small_config(d_model=C, norm="pre"), rng, F64),
                                                  {"parallel": Adapter("p", C, acfg, rng, F64, skip=False)}, 0),
              }[make]()
    out, cache = module.forward(rng.standard_normal((2, 4, C)))
    dout = rng.standard_normal(out.shape)
    before = dout.copy()
    module.backward(dout, cache)
    np.testing.assert_array_equal(dout, before)


class BlockUnderTest:
    """A Block (with optional adapters) in check_module's container protocol; dropout replayed."""

    def __init__(self, block, adapters, dropout_seed):
        self.block, self.adapters, self.seed = block, adapters, dropout_seed
        slots = {"attn": (block.sub1, "adapter"), "ffn": (block.sub2, "adapter"), "parallel": (block.sub2, "parallel")}
        for site, adapter in adapters.items():
            plug(*slots[site], adapter)

    def forward(self, x, bias=None):
        rng = np.random.default_rng(self.seed)
        return self.block.forward(x, bias, True, rng)

    def backward(self, dout, cache):
        return self.block.backward(dout, cache)

    def parameters(self):
        mods = self.block.modules() + list(self.adapters.values())
        return [p for m in mods for p in m.parameters()]


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("placement", [None, "houlsby", "parallel"])
def test_check_block(norm, placement, rng):
    cfg = small_config(norm=norm, dropout=0.2)
    block = Block(0, cfg, rng, F64)
    for ln in (block.ln1, block.ln2):
        for p in ln.parameters():
            p.value += 0.3 * rng.standard_normal(p.value.shape)
    adapters = {}
    if placement:
        acfg = AdapterConfig(bottleneck=3, init_std=0.3, placement=placement)
        adapters = {site: Adapter(f"ad.{site}", 8, acfg, rng, F64, skip=site != "parallel")
                    for site in acfg.sites()}
    module = BlockUnderTest(block, adapters, dropout_seed=3)
    pad = np.array([[True] * 5, [True, True, True, False, False]])
    errors = check_module(module, rng.standard_normal((2, 5, 8)), bias=attention_bias(5, True, pad, F64))
    assert set(errors) == {"x"} | {p.name for p in module.parameters()}
    assert max(errors.values()) <= OP_THRESHOLD, errors


# ----------------------------------------------------------------------------- the whole model


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("head", ["lm", "cls"])
@pytest.mark.parametrize("causal", [False, True])
def test_check_model_every_parameter(norm, head, causal):
    """The loss against every parameter: padding mask, dropout 0.1 replayed, both poolings."""
    pooling = "mean" if causal else "first"
    model = generic_model(norm=norm, causal=causal, pooling=pooling, dropout=0.1)
    ids, targets, pad_mask = batch(model.config, head=head)
    rows = check_model(model, ids, targets, pad_mask, head, dropout_seed=7)
    assert [r[0] for r in rows] == list(model.named_parameters())  # every parameter, in order
    errors = {name: err for name, _, trainable, err in rows}
    assert all(e is not None for e in errors.values())  # nothing frozen here: all checked
    assert max(errors.values()) <= MODEL_THRESHOLD, {k: e for k, e in errors.items() if e > MODEL_THRESHOLD}


def test_check_model_notices_a_wrong_gradient(monkeypatch):
    """The model check must fail when a backward is wrong: scale GELU's gradient by 1.01."""
    from minitransformer import backend
    real = backend.ops.gelu_backward
    monkeypatch.setattr(backend.ops, "gelu_backward", lambda d, c: (real(d, c)[0] * 1.01, {}))
    model = generic_model()
    ids, targets, pad_mask = batch(model.config)
    rows = check_model(model, ids, targets, pad_mask)
    bad = [name for name, _, _, err in rows if err > MODEL_THRESHOLD]
    assert "blocks.0.ffn.W_1" in bad and "blocks.0.attn.W_q" in bad  # below the FFN: wrong
    assert "lm_head.W" not in bad  # above it: still right


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_causal_model_does_not_look_ahead(norm, rng):
    model = Transformer(small_config(norm=norm, causal=True, dtype="float32"), seed=0)
    ids = rng.integers(0, 11, (2, 6))
    later = ids.copy()
    later[:, 4:] = (later[:, 4:] + 1) % 11  # change the last two tokens
    a, _ = model.forward(ids)
    b, _ = model.forward(later)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.array_equal(a[:, 4:], b[:, 4:])


def test_padding_does_not_change_real_positions(rng):
    model = Transformer(small_config(dtype="float32", pooling="mean"), seed=0)
    ids = rng.integers(0, 11, (2, 6))
    pad = np.ones((2, 6), bool)
    pad[1, 3:] = False
    other = ids.copy()
    other[1, 3:] = (other[1, 3:] + 5) % 11  # different tokens under the padding
    a, _ = model.forward(ids, pad)
    b, _ = model.forward(other, pad)
    np.testing.assert_array_equal(a[1, :3], b[1, :3])
    np.testing.assert_array_equal(model.forward(ids, pad, head="cls")[0], model.forward(other, pad, head="cls")[0])


def test_a_row_of_padding_only_is_refused():
    """A sequence that is padding everywhere would leave its queries nothing to attend to: the
    model refuses it in one line naming pad_mask (attention itself stays finite on such a row:
    tests/test_attention.py)."""
    model = Transformer(small_config(dtype="float32", causal=True), seed=0)
    ids, _, pad = batch(model.config)
    pad[2] = False
    with pytest.raises(ValueError, match=r"^pad_mask: expected at least one real token \(True\) in every row, "
                                         r"got row 2"):
        model.forward(ids, pad)


def test_seed_and_cache_are_checked():
    with pytest.raises(ValueError, match="^seed: expected a non-negative integer, got -1"):
        Transformer(small_config(), seed=-1)
    model = Transformer(small_config(), seed=0)
    ids, targets, pad = batch(model.config)
    logits, _ = model.forward(ids, pad)
    with pytest.raises(ValueError, match="^cache: expected the cache forward returned"):
        model.backward(np.ones_like(logits), None)


def test_gradients_accumulate_until_zero_grad():
    """Two backward passes without zero_grad add their gradients (STYLE.md rule 5)."""
    model = generic_model()
    ids, targets, pad_mask = batch(model.config)
    model.loss(ids, targets, pad_mask, backward=True)
    once = {n: p.grad.copy() for n, p in model.named_parameters().items() if p.grad is not None}
    assert set(once) == {n for n in model.named_parameters() if not n.startswith("cls_head.")}  # unused under "lm"
    model.loss(ids, targets, pad_mask, backward=True)
    for n in once:
        p = model.named_parameters()[n]
        np.testing.assert_allclose(p.grad, 2 * once[n], rtol=1e-12, atol=1e-15, err_msg=n)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model.loss(ids, targets, pad_mask)  # backward=False is the default
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- determinism


def run_once(seed, dropout_seed):
    cfg = ModelConfig(vocab_size=13, max_len=8, d_model=16, n_heads=4, n_layers=2, d_ff=32, dropout=0.1,
                      n_classes=2)
    model = Transformer(cfg, seed=seed)
    model.add_adapter("t", AdapterConfig(bottleneck=4), seed=seed)
    model.train_adapter("t")
    ids, _, pad = batch(cfg, head="cls")
    logits, loss = model.loss(ids, np.array([0, 1, 1]), pad, head="cls", train=True,
                              rng=np.random.default_rng(dropout_seed), backward=True)
    return logits, {n: p.grad for n, p in model.named_parameters().items() if p.grad is not None}


def test_same_seed_is_bit_identical():
    logits_a, grads_a = run_once(seed=3, dropout_seed=9)
    logits_b, grads_b = run_once(seed=3, dropout_seed=9)
    assert logits_a.tobytes() == logits_b.tobytes()
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert all(grads_a[n].tobytes() == grads_b[n].tobytes() for n in grads_a)
    logits_c, _ = run_once(seed=4, dropout_seed=9)  # and the seed does matter
    logits_d, _ = run_once(seed=3, dropout_seed=10)
    assert not np.array_equal(logits_a, logits_c) and not np.array_equal(logits_a, logits_d)


# ----------------------------------------------------------------------------- the command


def test_gradcheck_command_exits_0_with_max_error():
    proc = subprocess.run([sys.executable, "-m", "minitransformer", "gradcheck"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    match = re.fullmatch(r"max relative error: (\S+)", lines[-1])
    assert match, lines[-1]
    assert 0 < float(match.group(1)) <= MODEL_THRESHOLD
    frozen = [line for line in lines if "frozen — no gradient computed" in line]
    assert any(line.startswith("blocks.0.attn.W_q ") for line in frozen)  # the base, frozen under adapters
    assert "FAIL" not in proc.stdout


@pytest.mark.parametrize("frozen", ["*.beta", "*.gamma"])
def test_a_layernorms_gamma_and_beta_freeze_on_their_own(frozen):
    """Freezing only the betas (or only the gammas) leaves the other half training: the frozen
    half gets no gradient, the other half gets its correct one."""
    model = generic_model()
    model.freeze(frozen)
    ids, targets, pad_mask = batch(model.config)
    model.loss(ids, targets, pad_mask, backward=True)  # no "frozen parameter must not receive a gradient"
    other = ".gamma" if frozen == "*.beta" else ".beta"
    params = model.named_parameters()
    assert all(p.grad is None for n, p in params.items() if n.endswith(frozen[1:]))
    assert all(p.grad is not None for n, p in params.items() if n.endswith(other))
    rows = {name: err for name, _, trains, err in check_model(model, ids, targets, pad_mask) if trains}
    assert max(err for n, err in rows.items() if n.endswith(other)) <= MODEL_THRESHOLD
