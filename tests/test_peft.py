"""LoRA, prefix tuning, prompt tuning and BitFit: their operations by hand and against finite
differences (OP_THRESHOLD = 1e-7), every new parameter of post-LN and pre-LN models with padding
and causal masks (MODEL_THRESHOLD = 1e-6), where each method sits (a forward wired by hand from
the pure operations), what "starts at the base" means for each, LoRA's merge, the prompt's
positions, the prefix MLP dropped after training, configs and the parameter report."""
import numpy as np
import pytest
from conftest import batch, move_layernorms, small_config, snapshot

from minitransformer import (AdapterConfig, BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig,
                             Transformer, backend, peft)
from minitransformer import layers as L
from minitransformer.attention import attend_forward, attention_bias, attention_forward
from minitransformer.gradcheck import MODEL_THRESHOLD, OP_THRESHOLD, check_function, check_model
from minitransformer.optim import AdamW

ALL = ("q", "k", "v", "o", "ffn1", "ffn2")
METHODS = {
    "lora": lambda: LoRAConfig(r=2, alpha=2.0, targets=ALL),
    "lora_qv": lambda: LoRAConfig(r=3),
    "prefix": lambda: PrefixConfig(n_prefix=3, reparameterize=False),
    "prefix_mlp": lambda: PrefixConfig(n_prefix=2, hidden=5, init_std=1.0),
    "prompt": lambda: PromptConfig(n_prompt=3, init="normal", init_std=0.5),
    "bitfit": lambda: BitFitConfig(),
}


def method_model(config, seed=0, off_start=True, **overrides):
    """A float64 model at a generic point with task "task" of `config`, trained alone. off_start:
    move the task off its exact start (LoRA's B = 0, BitFit's copies = the base's), so that every
    gradient is generic."""
    model = Transformer(small_config(**overrides), seed=seed)
    s = model.add_adapter("task", config, n_classes=3, seed=seed + 1)
    move_layernorms(model, seed + 100)
    rng = np.random.default_rng(seed + 200)
    if off_start:
        for p in s.parameters():
            if ".lora.B_" in p.name or s.method == "bitfit":
                p.value += 0.3 * rng.standard_normal(p.value.shape)
    model.train_adapter("task")
    return model


def float32_model(norm="post", **overrides):
    return Transformer(small_config(norm=norm, dtype="float32", init_std=0.02, **overrides), seed=0)


# ----------------------------------------------------------------------------- operations


def test_lora_by_hand():
    x = np.array([[1.0, 2.0], [0.0, -1.0]])  # (N=2, d_in=2)
    A = np.array([[1.0], [0.5]])  # (2, r=1)
    B = np.array([[2.0, 0.0, -1.0]])  # (1, d_out=3)
    out, cache = peft.lora_forward(x, A, B, 0.5)
    # x A = [[2], [-0.5]];  0.5 (x A) B = [[2, 0, -1], [-0.5, 0, 0.25]]
    np.testing.assert_array_equal(out, [[2.0, 0.0, -1.0], [-0.5, 0.0, 0.25]])
    dx, grads = peft.lora_backward(np.ones((2, 3)), cache)
    dA, dB = grads["A"], grads["B"]
    # dv = 0.5; dB = u^T dv = [[2 - 0.5] * 0.5] per column; du = dv B^T = 0.5 * 1 = 0.5 per row
    np.testing.assert_array_equal(dB, [[0.75, 0.75, 0.75]])
    np.testing.assert_array_equal(dA, [[0.5], [0.5]])  # x^T du = [1 + 0, 2 - 1] * 0.5
    np.testing.assert_array_equal(dx, [[0.5, 0.25], [0.5, 0.25]])  # du A^T
    W = np.zeros((2, 3))
    np.testing.assert_array_equal(peft.lora_merge(W, A, B, 0.5) - W, 0.5 * A @ B)


def test_lora_starts_at_zero_and_inits_as_documented():
    rng = np.random.default_rng(0)
    for init, check in (("gaussian", lambda A: abs(A.std() - 1 / 8) < 0.01),
                        ("kaiming", lambda A: np.abs(A).max() <= 1 / np.sqrt(256) and A.std() > 0.03)):
        A, B = peft.init_lora(LoRAConfig(r=8, init=init), 256, 64, rng, np.float32)
        assert A.shape == (256, 8) and B.shape == (8, 64) and A.dtype == B.dtype == np.float32
        assert not B.any() and check(A), init


def test_lora_backward_skips_what_is_not_needed(rng):
    x, A, B = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal((2, 5))
    _, cache = peft.lora_forward(x, A, B, 2.0)
    assert peft.lora_backward(np.ones((3, 5)), cache, need_dx=False, need_dA=False, need_dB=False) == (None, {})
    dx, grads = peft.lora_backward(np.ones((3, 5)), cache, need_dx=False, need_dA=False)
    assert dx is None and list(grads) == ["B"] and grads["B"].shape == (2, 5)


def lora_branches(rng, targets, C, r=2):
    return {t: (rng.standard_normal((C, r)) * 0.5, rng.standard_normal((r, C)) * 0.5, 1.5) for t in targets}


@pytest.mark.parametrize("targets", ["qv", "ko", "qkvo"])
@pytest.mark.parametrize("n_prefix", [0, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_attention_with_lora_and_prefix(targets, n_prefix, causal, rng):
    """LoRA branches plugged into the attention's linear slots and a prefix into its kv hook:
    attention.py is not touched, and every gradient checks out."""
    from minitransformer.gradcheck import check_module
    from minitransformer.modules import Attention, Linear, Parameter, plug
    from minitransformer.parts import LowRank, PrefixKV
    C, H = 6, 2
    attn = Attention("attn", C, H, rng, np.float64, std=0.5)
    for p in attn.parameters():
        p.value += 0.5 * rng.standard_normal(p.value.shape)  # biases off zero
    extra = []
    for t, (A, B, s) in lora_branches(rng, targets, C).items():
        branch = LowRank(Parameter(f"A_{t}", A), Parameter(f"B_{t}", B), s)
        plug(attn, f"{t}_proj", Linear(attn.p[f"W_{t}"], attn.p[f"b_{t}"], branch))
        extra += branch.parameters()
    pad = np.array([[True] * 4, [True, True, False, False]])
    bias = attention_bias(4, causal, pad, np.float64)
    if n_prefix:
        kv = PrefixKV("prefix", rng.standard_normal((n_prefix, C)), rng.standard_normal((n_prefix, C)))
        plug(attn, "kv", kv)  # it widens the mask itself: every query may look at the prefix
        extra += kv.parameters()

    class WithParts:
        forward, backward = attn.forward, attn.backward

        def parameters(self):
            return attn.parameters() + extra
    errors = check_module(WithParts(), rng.standard_normal((2, 4, C)), bias=bias)
    assert len(errors) == 1 + 8 + 2 * len(targets) + (2 if n_prefix else 0)
    assert max(errors.values()) <= OP_THRESHOLD, errors


def test_gradcheck_prefix_mlp_prompt_and_strip(rng):
    C, n, Lyr = 4, 3, 2
    w = {"W_1": rng.standard_normal((C, 5)), "b_1": rng.standard_normal(5),
         "W_2": rng.standard_normal((5, 2 * Lyr * C)), "b_2": rng.standard_normal(2 * Lyr * C)}
    errors = check_function(lambda P0, **ws: peft.prefix_mlp_forward(P0, ws, Lyr), peft.prefix_mlp_backward,
                            {"P0": rng.standard_normal((n, C)), **w})
    assert len(errors) == 5 and max(errors.values()) <= OP_THRESHOLD, errors
    errors = check_function(peft.prompt_forward, peft.prompt_backward,
                            {"x": rng.standard_normal((2, 3, C)), "P": rng.standard_normal((n, C))})
    assert max(errors.values()) <= OP_THRESHOLD, errors
    errors = check_function(lambda h: peft.strip_prompt_forward(h, n),
                            peft.strip_prompt_backward, {"h": rng.standard_normal((2, 5, C))})
    assert errors["h"] <= OP_THRESHOLD


def test_prefix_mlp_splits_layers_keys_and_values_as_documented(rng):
    """prefixes[i, 0] is layer i's P_k: the columns i*2C .. i*2C + C of the MLP's output."""
    C, Lyr = 4, 3
    w = {"W_1": rng.standard_normal((C, 5)), "b_1": rng.standard_normal(5),
         "W_2": rng.standard_normal((5, 2 * Lyr * C)), "b_2": rng.standard_normal(2 * Lyr * C)}
    P0 = rng.standard_normal((2, C))
    prefixes, _ = peft.prefix_mlp_forward(P0, w, Lyr)
    y = np.tanh(P0 @ w["W_1"] + w["b_1"]) @ w["W_2"] + w["b_2"]  # (n, 2 L C)
    assert prefixes.shape == (Lyr, 2, 2, C)
    for i in range(Lyr):
        np.testing.assert_allclose(prefixes[i, 0], y[:, 2 * i * C: 2 * i * C + C], rtol=1e-14)
        np.testing.assert_allclose(prefixes[i, 1], y[:, 2 * i * C + C: 2 * (i + 1) * C], rtol=1e-14)


def test_attention_bias_with_prefix_columns():
    pad = np.array([[True, True, False]])
    bias = peft.prefix_bias(attention_bias(3, True, pad, np.float64), 3, 2)
    assert bias.shape == (1, 1, 3, 5)
    allowed = np.isfinite(bias[0, 0])
    # every query sees both prefix columns; then causal and padding as without a prefix
    np.testing.assert_array_equal(allowed, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert peft.prefix_bias(attention_bias(3, False, None), 3, 2) is None  # nothing hidden: no mask at all
    assert peft.prefix_bias(attention_bias(3, True, None), 3, 2).shape == (1, 1, 3, 5)


def test_a_prefix_with_zero_values_only_shrinks_attention(rng):
    """The exact form of "a prefix cannot be a no-op": with P_v = 0, each query's context is the
    base's times (1 - pi), pi the probability it puts on the prefix keys (before W_o)."""
    C, H, n = 6, 2, 2
    w = {f"{k}_{m}": rng.standard_normal((C, C) if k == "W" else C) * 0.5 for m in "qkvo" for k in "Wb"}
    w["W_o"], w["b_o"] = np.eye(C), np.zeros(C)  # out = the merged context itself
    x = rng.standard_normal((2, 4, C))
    base, _ = attention_forward(x, w, H)
    q, k, v = (x @ w[f"W_{t}"] + w[f"b_{t}"] for t in "qkv")
    k, v, _ = peft.prefix_forward(k, v, rng.standard_normal((n, C)), np.zeros((n, C)))
    ctx, (Q, K, V, P, scale) = attend_forward(q, k, v, H)
    out = ctx @ w["W_o"] + w["b_o"]
    pi = P[..., :n].sum(-1)  # (B, H, T)
    shrink = np.repeat(1 - pi.transpose(0, 2, 1), C // H, axis=-1)  # (B, T, C), per head
    assert pi.min() > 0.05  # the prefix does take a share
    np.testing.assert_allclose(out, base * shrink, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("head, causal", [("cls", False), ("lm", True)])
def test_gradcheck_every_new_parameter(method, norm, head, causal):
    """Every parameter of the task, the base frozen; padding everywhere, causal under the LM head."""
    model = method_model(METHODS[method](), norm=norm, causal=causal, dropout=0.1,
                         pooling="mean" if norm == "pre" else "first")
    ids, targets, pad = batch(model.config, head=head)
    rows = check_model(model, ids, targets, pad, head, dropout_seed=3)
    checked = {name: err for name, _, trains, err in rows if trains}
    assert set(checked) == {n for n in model.named_parameters() if n.startswith("adapters.task.")}
    if head == "lm":  # the task's classifier is not on the LM path: zero gradient, zero differences
        checked = {n: e for n, e in checked.items() if ".head." not in n}
    assert max(checked.values()) <= MODEL_THRESHOLD, checked
    assert all(err is None for name, _, trains, err in rows if not name.startswith("adapters."))


def reference_logits(model, ids, pad_mask, head="lm"):
    """The active task's logits recomputed from the pure operations, wired as the papers describe:
    LoRA adds s (x A) B beside each target weight; the prefix joins every attention's keys and
    values; the prompt goes in front of the embedded tokens (no position) and the heads read only
    the real tokens; BitFit's copies replace the base's biases."""
    cfg, s = model.config, model.adapters[model.active_adapter]
    own = s.copies

    def p(path, module, local):
        return own.get(path, {}).get(local, module.p[local]).value

    def ln(path, module, x):
        return L.layernorm_forward(x, p(path, module, "gamma"), p(path, module, "beta"), cfg.ln_eps)[0]

    def lora(i, t, x):
        lo = s.lora[i]
        if lo is None or t not in lo.targets:
            return 0
        return lo.scale * (x @ lo.p[f"A_{t}"].value) @ lo.p[f"B_{t}"].value

    n = s.n_prompt()
    x = model.embed.w["W_tok"][ids] + model.embed.w["W_pos"][:ids.shape[1]]
    mask = pad_mask
    if n:
        P = s.prompt.p["P"].value
        x = np.concatenate([np.repeat(P[None], len(ids), 0), x], 1)
        mask = np.concatenate([np.ones((len(ids), n), bool), pad_mask], 1)
    x = ln("ln_emb", model.ln_emb, x) if cfg.norm == "post" else x
    prefixes, _ = s.precompute()
    prefixes = prefixes or (s.prefix_kv if s.prefix_kv[0] is not None else None)
    n_pre = s.n_prefix()
    bias = attention_bias(x.shape[1], cfg.causal, mask, x.dtype)
    bias = peft.prefix_bias(bias, x.shape[1], n_pre) if n_pre else bias
    for i, block in enumerate(model.blocks):
        at, ff, path = block.attn, block.ffn, f"blocks.{i}"
        pre = cfg.norm == "pre"
        a_in = ln(f"{path}.ln1", block.ln1, x) if pre else x
        proj = {t: a_in @ at.w[f"W_{t}"] + p(f"{path}.attn", at, f"b_{t}") + lora(i, t, a_in) for t in "qkv"}
        if n_pre:
            P_k, P_v = (prefixes[i].p[k].value for k in ("P_k", "P_v"))
            proj["k"] = np.concatenate([np.repeat(P_k[None], len(ids), 0), proj["k"]], 1)
            proj["v"] = np.concatenate([np.repeat(P_v[None], len(ids), 0), proj["v"]], 1)
        Q, K, V = (proj[t].reshape(len(ids), -1, cfg.n_heads, cfg.d_model // cfg.n_heads).transpose(0, 2, 1, 3)
                   for t in "qkv")
        S = Q @ K.swapaxes(-1, -2) / np.sqrt(Q.shape[-1]) + (0 if bias is None else bias)
        ctx = (L.softmax_forward(S)[0] @ V).transpose(0, 2, 1, 3).reshape(x.shape)
        a = ctx @ at.w["W_o"] + p(f"{path}.attn", at, "b_o") + lora(i, "o", ctx)
        h = x + a if pre else ln(f"{path}.ln1", block.ln1, x + a)
        f_in = ln(f"{path}.ln2", block.ln2, h) if pre else h
        hid = f_in @ ff.w["W_1"] + p(f"{path}.ffn", ff, "b_1") + lora(i, "ffn1", f_in)
        act = L.gelu_forward(hid)[0]
        f = act @ ff.w["W_2"] + p(f"{path}.ffn", ff, "b_2") + lora(i, "ffn2", act)
        x = h + f if pre else ln(f"{path}.ln2", block.ln2, h + f)
    x = ln("ln_f", model.ln_f, x) if cfg.norm == "pre" else x
    x = x[:, n:]
    if head == "lm":
        return x @ model.lm_head.w["W"] + model.lm_head.w["b"]
    keep = pad_mask / pad_mask.sum(1, keepdims=True)
    pooled = x[:, 0] if cfg.pooling == "first" else np.einsum("bt,btc->bc", keep, x)
    return pooled @ s.head.w["W"] + s.head.w["b"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm, causal, pooling", [("post", False, "first"), ("pre", True, "mean")])
def test_each_method_sits_where_its_paper_puts_it(method, norm, causal, pooling):
    model = method_model(METHODS[method](), norm=norm, causal=causal, pooling=pooling)
    ids, _, pad = batch(model.config)
    for head in ("lm", "cls"):
        logits, _ = model.forward(ids, pad, head=head)
        np.testing.assert_allclose(logits, reference_logits(model, ids, pad, head), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", backend.PATHS)
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("config", [LoRAConfig(targets=ALL), LoRAConfig(init="gaussian"), BitFitConfig()],
                         ids=["lora_all", "lora_gaussian", "bitfit"])
def test_lora_and_bitfit_start_exactly_at_the_base(path, norm, config):
    """B = 0 adds exact zeros; BitFit's copies equal the base's: the logits are the bare base's,
    bit for bit, under both heads (the task head is the base's classifier for the comparison)."""
    model = float32_model(norm, n_classes=3)
    ids, _, pad = batch(model.config)
    with backend.using(path):
        base = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
        model.add_adapter("t", config, n_classes=3)
        model.adapters["t"].head = model.cls_head
        model.set_active_adapter("t")
        task = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(base, task))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_prefix_or_prompt_always_changes_the_output(method):
    """What cannot be an exact no-op: even near-zero prefix keys/values or prompt embeddings
    take a share of attention, so the logits move (a little)."""
    model = float32_model()
    ids, _, pad = batch(model.config)
    base, _ = model.forward(ids, pad)
    config = PrefixConfig(n_prefix=2, reparameterize=False, init_std=1e-3) if method == "prefix" \
        else PromptConfig(n_prompt=2, init="normal", init_std=1e-3)
    model.add_adapter("t", config)
    model.set_active_adapter("t")
    out, _ = model.forward(ids, pad)
    assert out.shape == base.shape and 0 < np.abs(out - base).max() < 0.1 * np.abs(base).max()


# ----------------------------------------------------------------------------- LoRA's merge


def trained_lora(dtype, norm="post", targets=ALL):
    model = Transformer(small_config(norm=norm, dtype=dtype, init_std=0.3), seed=0)
    s = model.add_adapter("t", LoRAConfig(r=2, targets=targets), n_classes=3, seed=1)
    rng = np.random.default_rng(2)
    for p in s.parameters():  # as if trained: B off zero
        p.value += (0.3 * rng.standard_normal(p.value.shape)).astype(p.value.dtype)
    model.set_active_adapter("t")
    return model


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("path", backend.PATHS)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_merged_lora_gives_the_same_logits_and_unmerge_restores_the_base(dtype, tolerance, path, norm):
    """x (W + s A B) and x W + s (x A) B differ only by rounding: to 1e-12 of the logits' scale
    in float64, 1e-5 in float32. Unmerge puts the original arrays back: the base bit for bit."""
    model = trained_lora(dtype, norm)
    ids, _, pad = batch(model.config)
    base = snapshot(model)
    with backend.using(path):
        before = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
        model.merge("t")
        assert snapshot(model) != base  # the weights hold the update now
        merged = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
        model.unmerge("t")
        after = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
    for b, m in zip(before, merged):
        assert m.dtype == np.dtype(dtype)
        assert np.abs(m - b).max() <= tolerance * np.abs(b).max()
    assert snapshot(model) == base  # every base array bit for bit
    assert all(a.tobytes() == b.tobytes() for a, b in zip(after, before))


def test_merge_by_hand_and_what_is_refused(monkeypatch):
    model = trained_lora("float64", targets=("q", "ffn2"))
    lo, attn, ffn = model.adapters["t"].lora[0], model.blocks[0].attn, model.blocks[0].ffn
    W_q, W_2, W_k = attn.p["W_q"].value, ffn.p["W_2"].value, attn.p["W_k"].value
    model.merge("t")
    np.testing.assert_array_equal(attn.p["W_q"].value, W_q + lo.scale * lo.p["A_q"].value @ lo.p["B_q"].value)
    np.testing.assert_array_equal(ffn.p["W_2"].value, W_2 + lo.scale * lo.p["A_ffn2"].value @ lo.p["B_ffn2"].value)
    assert attn.p["W_k"].value is W_k  # not a target: untouched
    calls = []
    monkeypatch.setattr(backend.ops, "lora_forward", lambda *a: calls.append(a))
    ids, _, pad = batch(model.config)
    model.forward(ids, pad)
    assert calls == []  # merged: no branch computed, the bare base's cost
    assert {n.rsplit(".", 1)[1] for n in model.active_parameters()} & {"A_q", "B_q"} == set()
    model.add_adapter("other", LoRAConfig())
    for bad in (lambda: model.set_active_adapter("other"), lambda: model.set_active_adapter(None),
                lambda: model.train_adapter("t"), lambda: model.merge("t"), lambda: model.delete_adapter("t")):
        with pytest.raises(ValueError, match=r"'t' is merged"):
            bad()
    model.unmerge("t")
    model.add_adapter("x", BitFitConfig())
    with pytest.raises(ValueError, match=r"expected a LoRA task to merge, got 'x' \(method 'bitfit'\)"):
        model.merge("x")
    with pytest.raises(ValueError, match="'t' is not merged"):
        model.unmerge("t")
    assert attn.p["W_q"].value is W_q and ffn.p["W_2"].value is W_2  # the very arrays back


# ----------------------------------------------------------------------------- prompt and prefix


def test_the_heads_ignore_the_prompt_positions(monkeypatch):
    """The heads receive the last hidden states of the T real tokens only: pooling "first" reads
    [CLS] (position n of the full sequence), the LM head gives (B, T, V). A max_len-long input
    still fits: the prompt has no position."""
    model = float32_model("post", pooling="first")
    s = model.add_adapter("t", PromptConfig(n_prompt=4), n_classes=3)
    model.set_active_adapter("t")
    ids, _, pad = batch(model.config, T=model.config.max_len)
    seen = {}
    real_strip, real_head = backend.ops.strip_prompt_forward, s.head.forward
    monkeypatch.setattr(backend.ops, "strip_prompt_forward",
                        lambda h, n: seen.setdefault("full", h) is None or real_strip(h, n))
    monkeypatch.setattr(s.head, "forward", lambda h, pad_mask: seen.setdefault("head", h) is None or
                        real_head(h, pad_mask))
    cls, _ = model.forward(ids, pad, head="cls")
    assert seen["full"].shape == (len(ids), 4 + ids.shape[1], 8) and seen["head"].shape == (*ids.shape, 8)
    np.testing.assert_array_equal(seen["head"], seen["full"][:, 4:])
    np.testing.assert_array_equal(cls, seen["head"][:, 0] @ s.head.w["W"] + s.head.w["b"])
    monkeypatch.undo()
    assert model.forward(ids, pad)[0].shape == (*ids.shape, model.config.vocab_size)


def test_prompt_is_real_for_the_mask_and_gets_no_position():
    """A padded sequence and the same tokens with other ids under the padding: same logits (the
    prompt is never masked); the prompt's rows are P itself, without a position embedding."""
    model = float32_model("pre", causal=True, pooling="mean")
    model.add_adapter("t", PromptConfig(n_prompt=2), n_classes=3)
    model.set_active_adapter("t")
    ids, _, pad = batch(model.config)
    other = ids.copy()
    other[~pad] = (other[~pad] + 3) % model.config.vocab_size
    for head in ("lm", "cls"):
        a, _ = model.forward(ids, pad, head=head)
        b, _ = model.forward(other, pad, head=head)
        np.testing.assert_array_equal(a[pad] if head == "lm" else a, b[pad] if head == "lm" else b)
    x, _ = model.embed.forward(ids)
    full, _, _ = model.adapters["t"].prompt.forward(x)
    np.testing.assert_array_equal(full[:, :2], np.broadcast_to(model.adapters["t"].prompt.w["P"], (len(ids), 2, 8)))


def test_dropping_the_prefix_mlp_keeps_the_forward(tmp_path):
    from minitransformer.tools.checkpoint import load_adapter, save_adapter
    model = method_model(PrefixConfig(n_prefix=2, hidden=5), causal=True)
    ids, _, pad = batch(model.config)
    before = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
    n_before = sum(p.value.size for p in model.adapters["task"].parameters())
    model.drop_prefix_mlp("task")
    s = model.adapters["task"]
    assert s.prefix_mlp is None and s.config.reparameterize is False
    names = {p.name for p in s.parameters()}
    assert names == {f"adapters.task.blocks.{i}.prefix.{k}" for i in range(2) for k in ("P_k", "P_v")} \
        | {"adapters.task.head.W", "adapters.task.head.b"}
    n_after = sum(p.value.size for p in s.parameters())
    assert n_after == 2 * 2 * 2 * 8 + 8 * 3 + 3 < n_before  # L x (P_k, P_v) x n x C + the head
    after = [model.forward(ids, pad, head=h)[0] for h in ("lm", "cls")]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after))
    with pytest.raises(ValueError, match="has no prefix MLP to drop"):
        model.drop_prefix_mlp("task")
    save_adapter(model, "task", tmp_path / "p.npz")
    assert load_adapter(model, tmp_path / "p.npz", name="again") == "again"
    model.set_active_adapter("again")
    assert model.forward(ids, pad)[0].tobytes() == before[0].tobytes()


# ----------------------------------------------------------------------------- configs, reports


@pytest.mark.parametrize("cls, fields, message", [
    (LoRAConfig, dict(r=0), r"r: expected a positive integer, got 0"),
    (LoRAConfig, dict(r=True), r"r: expected a positive integer, got True"),
    (LoRAConfig, dict(alpha=float("nan")), r"alpha: expected a number > 0, got nan"),
    (LoRAConfig, dict(targets=("q", "x")), r"targets: expected distinct names from .*, at least one, got \('q', 'x'\)"),
    (LoRAConfig, dict(targets="qv"), r"targets: expected a tuple of names from .*, got 'qv'"),
    (LoRAConfig, dict(targets=()), r"targets: expected distinct names .*, at least one, got \(\)"),
    (LoRAConfig, dict(init="xavier"), r"init: expected one of \('gaussian', 'kaiming'\), got 'xavier'"),
    (PrefixConfig, dict(n_prefix=0), r"n_prefix: expected a positive integer, got 0"),
    (PrefixConfig, dict(reparameterize=1), r"reparameterize: expected True or False, got 1"),
    (PrefixConfig, dict(hidden=2.5), r"hidden: expected a positive integer, got 2.5"),
    (PrefixConfig, dict(init_std=-1), r"init_std: expected a number >= 0, got -1"),
    (PromptConfig, dict(n_prompt=-2), r"n_prompt: expected a positive integer, got -2"),
    (PromptConfig, dict(init="zeros"), r"init: expected one of \('vocab', 'normal'\), got 'zeros'"),
    (BitFitConfig, dict(biases=("q", "q")), r"biases: expected distinct names from .*, got \('q', 'q'\)"),
    (BitFitConfig, dict(biases=(), layernorm=False), r"biases: expected at least one bias to train, got none"),
    (BitFitConfig, dict(layernorm="yes"), r"layernorm: expected True or False, got 'yes'"),
])
def test_bad_configs_are_refused_naming_the_field(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)


def test_configs_from_json_lists_become_tuples():
    assert LoRAConfig(targets=["q", "v"]) == LoRAConfig()
    assert BitFitConfig(biases=list(peft.BIASES)) == BitFitConfig()


def test_add_adapter_refuses_something_that_is_no_config():
    model = float32_model()
    with pytest.raises(TypeError, match=r"config: expected one of AdapterConfig, LoRAConfig, .*got dict"):
        model.add_adapter("t", {"r": 4})


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_parameter_report_counts_every_method(norm):
    """Counts from the architecture: V=11, T=8, C=8, F=16, 2 blocks; task head (C, 3)."""
    C, F, Lyr, K = 8, 16, 2, 3
    n_ln = 2 * Lyr + 1  # ln_emb (post) or ln_f (pre), and ln1, ln2 per block
    head = C * K + K
    expected = [
        (LoRAConfig(r=2, targets=("q", "v", "ffn1")), {"LoRA": Lyr * (2 * (C * 2 + 2 * C) + (C * 2 + 2 * F))}),
        (PrefixConfig(n_prefix=3, reparameterize=False), {"prefix": Lyr * 2 * 3 * C}),
        (PrefixConfig(n_prefix=3, hidden=5), {"prefix": 3 * C + C * 5 + 5 + 5 * 2 * Lyr * C + 2 * Lyr * C}),
        (PromptConfig(n_prompt=4), {"prompt": 4 * C}),
        (BitFitConfig(), {"biases": Lyr * (4 * C + F + C), "LayerNorm": n_ln * C}),
        (BitFitConfig(biases=("q", "ffn1"), layernorm=False), {"biases": Lyr * (C + F)}),
    ]
    for config, groups in expected:
        model = Transformer(small_config(norm=norm, n_classes=0), seed=0)
        model.add_adapter("t", config, n_classes=K)
        model.train_adapter("t")
        report = model.parameter_groups()
        trained = {g: tr for g, (_, tr) in report.items() if tr}
        assert trained == {**groups, "heads": head}, config
        assert model.num_parameters(trainable_only=True) == sum(groups.values()) + head
        base_ln = 2 * C * n_ln  # the base's own LayerNorms, frozen
        assert report["LayerNorm"][0] == base_ln + groups.get("LayerNorm", 0)


def test_tasks_of_different_methods_never_interfere():
    model = float32_model(n_classes=3)
    ids, _, pad = batch(model.config)
    labels = np.array([0, 1, 2])
    for name, config in (("lora", LoRAConfig()), ("prefix", PrefixConfig()), ("prompt", PromptConfig()),
                         ("bitfit", BitFitConfig()), ("adapter", AdapterConfig(bottleneck=4))):
        model.add_adapter(name, config, n_classes=3, seed=1)
    outputs = {}
    for name in model.adapters:
        model.train_adapter(name)
        opt = AdamW(model.parameters(), lr=1e-2)
        before = snapshot(model)
        for _ in range(2):
            opt.zero_grad()
            model.loss(ids, labels, pad, head="cls", backward=True)
            opt.step()
        after = snapshot(model)
        changed = {n for n in after if after[n] != before[n]}
        assert changed and all(n.startswith(f"adapters.{name}.") for n in changed), name
        outputs[name] = model.forward(ids, pad, head="cls")[0]
    for name, out in outputs.items():  # every task still gives what it gave right after its training
        model.set_active_adapter(name)
        assert model.forward(ids, pad, head="cls")[0].tobytes() == out.tobytes(), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["cls", "lm"])
def test_active_parameters_are_exactly_what_a_backward_reaches(method, head):
    """Everything unfrozen, a second task beside the active one: the parameters that receive a
    gradient are active_parameters(head), no more (the other task, the unused head) and no less."""
    model = method_model(METHODS[method](), norm="pre", causal=head == "lm", n_classes=3)
    model.add_adapter("other", AdapterConfig(bottleneck=2), n_classes=3)
    model.set_active_adapter("task")
    model.unfreeze()
    ids, targets, pad = batch(model.config, head=head)
    model.loss(ids, targets, pad, head=head, backward=True)
    reached = {n for n, p in model.named_parameters().items() if p.grad is not None}
    assert reached == set(model.active_parameters(head))
    assert not any(n.startswith(("adapters.other.", "cls_head.")) for n in reached)
    if model.adapters["task"].method == "lora":  # merged: A and B are not used, W_q carries them
        model.zero_grad()
        model.merge("task")
        assert not any(".lora." in n for n in model.active_parameters(head))


def test_a_second_backward_on_the_same_cache_adds_the_prefix_mlp_gradient_once_more():
    """Gradients add (STYLE.md rule 5): two backward passes on one cache give exactly twice the
    gradient, the prefix MLP's included (its per-pass P_k, P_v are taken and cleared each time)."""
    model = method_model(PrefixConfig(n_prefix=2, hidden=5), dropout=0.0)
    ids, targets, pad = batch(model.config)
    logits, cache = model.forward(ids, pad, head="cls")
    dlogits = np.random.default_rng(0).standard_normal(logits.shape)
    model.zero_grad()
    model.backward(dlogits, cache)
    once = {n: p.grad.copy() for n, p in model.named_parameters().items() if p.grad is not None}
    assert any(".prefix_mlp." in n for n in once)
    model.backward(dlogits, cache)
    for n, g in once.items():
        np.testing.assert_array_equal(model.named_parameters()[n].grad, 2 * g)


@pytest.mark.parametrize("path", backend.PATHS)
@pytest.mark.parametrize("method", METHODS)
def test_float32_stays_float32_end_to_end_for_every_method(method, path):
    """The constants are Python floats (weak scalars in NumPy 2): every activation, gradient and
    updated weight stays float32, on both paths, for every method (merged LoRA too)."""
    model = Transformer(small_config(dtype="float32", dropout=0.1), seed=0)
    model.add_adapter("t", METHODS[method](), n_classes=3, seed=1)
    model.train_adapter("t")
    ids, _, pad = batch(model.config)
    rng = np.random.default_rng(0)
    with backend.using(path):
        for head, targets in (("cls", np.array([0, 1, 2])), ("lm", np.where(pad, ids, -100))):
            model.zero_grad()
            logits, loss = model.loss(ids, targets, pad, head=head, train=True, rng=rng, backward=True)
            assert logits.dtype == np.float32
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(g.dtype == np.float32 for g in grads)
            AdamW(model.parameters(trainable_only=True), lr=1e-3).step()
            assert all(p.value.dtype == np.float32 for p in model.parameters())
        if method == "lora":
            model.merge("t")
            assert model.forward(ids, pad, head="cls")[0].dtype == np.float32
            assert all(p.value.dtype == np.float32 for p in model.parameters())
            model.unmerge("t")
