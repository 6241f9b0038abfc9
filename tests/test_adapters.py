"""The adapter proofs (gradients through the frozen base, near-identity at init, tasks
that never interfere) and the parameter report, freezing patterns and the LayerNorm switch."""
import numpy as np
import pytest
from conftest import batch, generic_adapter, generic_model, snapshot

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer import layers as L
from minitransformer.adapters import adapter_backward, adapter_forward
from minitransformer.attention import attention_bias, attention_forward
from minitransformer.gradcheck import MODEL_THRESHOLD, OP_THRESHOLD, check_function, check_model
from minitransformer.optim import AdamW

PLACEMENTS = ["houlsby", "ffn", "parallel"]


def float32_model(norm="post", n_classes=0, seed=0):
    cfg = ModelConfig(vocab_size=13, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32, norm=norm,
                      n_classes=n_classes)
    return Transformer(cfg, seed=seed)


def ids_and_mask(B=4, T=7, seed=0):
    rng = np.random.default_rng(seed)
    pad = np.ones((B, T), bool)
    pad[1, 5:] = False
    return rng.integers(0, 13, (B, T)), pad


def train_steps(model, name, ids, pad, labels, steps=3, lr=1e-2):
    """A few AdamW steps on adapter `name` (train_adapter freezes everything else)."""
    model.train_adapter(name)
    opt = AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model.zero_grad()
        model.loss(ids, labels, pad, head="cls", backward=True)
        opt.step()
    return opt


# ----------------------------------------------------------------------------- 1. gradients


@pytest.mark.parametrize("nonlinearity, skip, scaling", [("gelu", True, 1.0), ("relu", True, 1.0),
                                                         ("tanh", True, 1.0), ("gelu", False, 4.0)])
def test_gradcheck_adapter_operation(nonlinearity, skip, scaling, rng):
    C, m = 6, 3
    h = rng.standard_normal((2, 4, C))
    h[np.abs(h) < 0.05] = 0.5  # relu's kink away from the finite differences
    w = {"W_down": rng.standard_normal((C, m)) * 0.5, "b_down": rng.standard_normal(m),
         "W_up": rng.standard_normal((m, C)) * 0.5, "b_up": rng.standard_normal(C)}
    errors = check_function(lambda h, **ws: adapter_forward(h, ws, nonlinearity, skip, scaling), adapter_backward,
                            {"h": h, **w})
    assert set(errors) == {"h", "W_down", "b_down", "W_up", "b_up"}
    assert max(errors.values()) <= OP_THRESHOLD, errors


def test_adapter_operation_value_by_hand():
    # C = 2, m = 1, relu: z = h @ W_down + b_down = 1*1 + 2*(-1) + 3 = 2; relu(2) = 2;
    # branch = 2 * W_up + b_up = [2, -4] + [0.5, 0.5]; scaled by s = 2: [5, -7]; plus the skip h
    w = {"W_down": np.array([[1.0], [-1.0]]), "b_down": np.array([3.0]),
         "W_up": np.array([[1.0, -2.0]]), "b_up": np.array([0.5, 0.5])}
    out, _ = adapter_forward(np.array([[1.0, 2.0]]), w, "relu", skip=True, scaling=2.0)
    np.testing.assert_array_equal(out, [[6.0, -5.0]])
    out, _ = adapter_forward(np.array([[1.0, 2.0]]), w, "relu", skip=False, scaling=2.0)
    np.testing.assert_array_equal(out, [[5.0, -7.0]])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("train_layernorm", [True, False])
def test_gradcheck_model_wrt_every_adapter_parameter(placement, norm, train_layernorm):
    """The loss against every adapter parameter, through the frozen base (float64, 1e-6)."""
    adapter = generic_adapter(placement=placement, train_layernorm=train_layernorm)
    model = generic_model(adapter=adapter, norm=norm, pooling="mean" if norm == "pre" else "first",
                          dropout=0.1)
    ids, targets, pad_mask = batch(model.config, head="cls")
    rows = check_model(model, ids, targets, pad_mask, head="cls", dropout_seed=5)  # raises if a frozen one got a grad
    checked = {name: err for name, _, trainable, err in rows if trainable}
    assert set(checked) == {n for n in model.named_parameters() if n.startswith("adapters.task.")}
    sites = {"houlsby": {"attn", "ffn"}, "ffn": {"ffn"}, "parallel": {"parallel"}}[placement]
    assert {n.split(".")[4] for n in checked if ".W_down" in n} == sites
    has_ln = any(n.endswith(".gamma") for n in checked)
    assert has_ln == train_layernorm
    assert max(checked.values()) <= MODEL_THRESHOLD, {k: e for k, e in checked.items() if e > MODEL_THRESHOLD}
    assert all(err is None for name, _, trainable, err in rows if not trainable)


def test_gradcheck_lm_head_through_frozen_base_with_causal_mask():
    """The adapters also train under the LM head (causal, pre-LN) with the LM head frozen."""
    model = generic_model(adapter=generic_adapter(), norm="pre", causal=True, dropout=0.1)
    ids, targets, pad_mask = batch(model.config, head="lm")
    rows = check_model(model, ids, targets, pad_mask, head="lm", dropout_seed=2)
    errors = {name: err for name, _, trainable, err in rows if trainable and ".head." not in name}
    assert errors and max(errors.values()) <= MODEL_THRESHOLD, errors


# ----------------------------------------------------------------------------- where adapters sit


def reference_forward(model, ids, pad_mask):
    """The model's LM logits recomputed from the pure operations, wired as the paper describes:
    post-LN: x = LN1(x + Ad_attn(Attn(x)));  x = LN2(x + Ad_ffn(FFN(x)))      (Houlsby et al.)
    pre-LN:  x = x + Ad_attn(Attn(LN1(x)));  x = x + Ad_ffn(FFN(LN2(x)))
    parallel: the FFN's output plus s * W_up f(W_down x_in) of the FFN's own input x_in."""
    cfg, s = model.config, model.adapters[model.active_adapter]
    ad_cfg, norms = s.config, {key: {**ln.p, **s.copies.get(key, {})} for key, ln in model.norms().items()}

    def ln(key, x):
        return L.layernorm_forward(x, norms[key]["gamma"].value, norms[key]["beta"].value, cfg.ln_eps)[0]

    def adapter(block, site, x):
        return adapter_forward(x, s.blocks[block][site].w, ad_cfg.nonlinearity, site != "parallel",
                               ad_cfg.scaling)[0]

    def ffn(block, x):
        w = model.blocks[block].ffn.w
        hidden = L.gelu_forward(L.linear_forward(x, w["W_1"], w["b_1"])[0])[0]
        return L.linear_forward(hidden, w["W_2"], w["b_2"])[0]

    x = model.embed.w["W_tok"][ids] + model.embed.w["W_pos"][:ids.shape[1]]
    x = ln("ln_emb", x) if cfg.norm == "post" else x
    bias = attention_bias(ids.shape[1], cfg.causal, pad_mask, x.dtype)
    for i, block in enumerate(model.blocks):
        pre = cfg.norm == "pre"
        a = attention_forward(ln(f"blocks.{i}.ln1", x) if pre else x, block.attn.w, cfg.n_heads, bias)[0]
        a = adapter(i, "attn", a) if "attn" in s.blocks[i] else a
        h = x + a if pre else ln(f"blocks.{i}.ln1", x + a)
        f_in = ln(f"blocks.{i}.ln2", h) if pre else h
        f = ffn(i, f_in)
        f = adapter(i, "ffn", f) if "ffn" in s.blocks[i] else f
        f = f + adapter(i, "parallel", f_in) if "parallel" in s.blocks[i] else f
        x = h + f if pre else ln(f"blocks.{i}.ln2", h + f)
    x = ln("ln_f", x) if cfg.norm == "pre" else x
    return L.linear_forward(x, model.lm_head.w["W"], model.lm_head.w["b"])[0]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_adapters_sit_where_the_paper_puts_them(placement, norm):
    model = generic_model(adapter=generic_adapter(placement=placement, scaling=2.0), norm=norm, causal=True)
    ids, _, pad_mask = batch(model.config)
    logits, _ = model.forward(ids, pad_mask)
    np.testing.assert_allclose(logits, reference_forward(model, ids, pad_mask), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- 3. near identity


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("train_layernorm", [True, False], ids=["paper", "adapterhub"])
def test_zero_init_up_is_exactly_the_base(placement, norm, train_layernorm):
    model = float32_model(norm)
    ids, pad = ids_and_mask()
    base, _ = model.forward(ids, pad)
    model.add_adapter("t", AdapterConfig(bottleneck=4, zero_init_up=True, placement=placement,
                                         train_layernorm=train_layernorm))
    model.set_active_adapter("t")
    with_adapter, _ = model.forward(ids, pad)
    assert np.array_equal(with_adapter, base)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_default_init_is_nearly_the_base(placement, norm):
    """init_std 1e-3: logits move by at most 1e-3 of their own scale (measured: 2e-7 to 4.5e-4,
    the largest for the parallel adapter in a pre-LN model), but they do move."""
    model = float32_model(norm)
    ids, pad = ids_and_mask()
    base, _ = model.forward(ids, pad)
    model.add_adapter("t", AdapterConfig(bottleneck=4, placement=placement))
    model.set_active_adapter("t")
    with_adapter, _ = model.forward(ids, pad)
    diff = np.abs(with_adapter - base).max()
    assert 0 < diff <= 1e-3 * np.abs(base).max()


# ----------------------------------------------------------------------------- 4. two tasks


@pytest.mark.parametrize("train_layernorm", [True, False], ids=["paper", "adapterhub"])
def test_training_task_b_leaves_task_a_unchanged(train_layernorm):
    model = float32_model()
    ids, pad = ids_and_mask()
    labels = np.array([0, 1, 1, 0])
    cfg = AdapterConfig(bottleneck=4, train_layernorm=train_layernorm)
    model.add_adapter("a", cfg, n_classes=2, seed=1)
    model.add_adapter("b", cfg, n_classes=2, seed=2)
    train_steps(model, "a", ids, pad, labels)
    model.set_active_adapter("a")
    a_cls, _ = model.forward(ids, pad, head="cls")
    a_lm, _ = model.forward(ids, pad)
    before_b = snapshot(model)
    train_steps(model, "b", ids, pad, 1 - labels)
    after_b = snapshot(model)
    changed = {n for n in after_b if after_b[n] != before_b[n]}
    assert changed and all(n.startswith("adapters.b.") for n in changed)
    model.set_active_adapter("a")
    assert np.array_equal(model.forward(ids, pad, head="cls")[0], a_cls)
    assert np.array_equal(model.forward(ids, pad)[0], a_lm)


def test_no_active_adapter_is_the_bare_base():
    model, twin = float32_model(seed=5), float32_model(seed=5)
    ids, pad = ids_and_mask()
    model.add_adapter("t", AdapterConfig(bottleneck=4), n_classes=2)
    train_steps(model, "t", ids, pad, np.array([0, 1, 0, 1]), lr=0.1)
    assert not np.array_equal(model.forward(ids, pad)[0], twin.forward(ids, pad)[0])  # the adapter acts
    model.set_active_adapter(None)
    assert np.array_equal(model.forward(ids, pad)[0], twin.forward(ids, pad)[0])
    model.delete_adapter("t")
    assert model.active_adapter is None and "t" not in model.adapters
    assert not any(n.startswith("adapters.") for n in model.named_parameters())


def test_train_layernorm_false_keeps_layernorms_frozen():
    model = float32_model()
    model.add_adapter("t", AdapterConfig(bottleneck=4, train_layernorm=False), n_classes=2)
    ids, pad = ids_and_mask()
    before = snapshot(model)
    train_steps(model, "t", ids, pad, np.array([0, 1, 0, 1]))
    after = snapshot(model)
    norms = [n for n in model.named_parameters() if n.endswith((".gamma", ".beta"))]
    assert norms and all(not n.startswith("adapters.") for n in norms)  # no per-task copies
    assert all(not model.named_parameters()[n].trainable for n in norms)
    assert all(after[n] == before[n] for n in norms)


def test_train_layernorm_true_trains_task_copies_only():
    model = float32_model()
    model.add_adapter("t", AdapterConfig(bottleneck=4), n_classes=2)
    params = model.named_parameters()
    copies = sorted(n for n in params if n.startswith("adapters.t.") and n.endswith((".gamma", ".beta")))
    base_norms = sorted(n for n in params if not n.startswith("adapters.") and n.endswith((".gamma", ".beta")))
    assert [c[len("adapters.t."):] for c in copies] == base_norms  # one copy of every LayerNorm
    ids, pad = ids_and_mask()
    before = snapshot(model)
    train_steps(model, "t", ids, pad, np.array([0, 1, 0, 1]))
    after = snapshot(model)
    assert all(after[n] == before[n] for n in base_norms)
    assert all(after[n] != before[n] for n in copies)


# ----------------------------------------------------------------------------- the report


def expected_counts(V, T, C, F, L, K_base, m, sites, task_K, ln_copies):
    """Parameter counts by group, from the architecture (post-LN: ln_emb + 2 LayerNorms per block)."""
    n_ln = 1 + 2 * L
    adapters = L * len(sites) * (C * m + m + m * C + C)
    return {"embeddings": V * C + T * C, "attention": L * 4 * (C * C + C),
            "FFN": L * (C * F + F + F * C + C),
            "LayerNorm": 2 * C * n_ln * (2 if ln_copies else 1),
            "adapters": adapters,
            "heads": (C * V + V) + (C * K_base + K_base) + (C * task_K + task_K)}


@pytest.mark.parametrize("placement, train_layernorm", [("houlsby", True), ("ffn", False), ("parallel", True)])
def test_parameter_report_numbers(placement, train_layernorm):
    model = float32_model(n_classes=3)
    model.add_adapter("t", AdapterConfig(bottleneck=4, placement=placement, train_layernorm=train_layernorm),
                      n_classes=5)
    model.train_adapter("t")
    sites = AdapterConfig(placement=placement).sites()
    total = expected_counts(V=13, T=8, C=16, F=32, L=2, K_base=3, m=4, sites=sites, task_K=5,
                            ln_copies=train_layernorm)
    trainable = {g: 0 for g in total}
    trainable["adapters"] = total["adapters"]
    trainable["heads"] = 16 * 5 + 5
    trainable["LayerNorm"] = 2 * 16 * 5 if train_layernorm else 0
    groups = model.parameter_groups()
    assert groups == {g: (total[g], trainable[g]) for g in total}
    n_total, n_train = sum(total.values()), sum(trainable.values())
    assert model.num_parameters() == n_total and model.num_parameters(trainable_only=True) == n_train
    report = model.parameter_report()
    assert report.splitlines()[-1] == (f"trainable params: {n_train:,} || all params: {n_total:,} || "
                                       f"trainable%: {100 * n_train / n_total:.4f}")
    for g in total:
        assert any(line.split() == [g, f"{total[g]:,}", f"{trainable[g]:,}"] for line in report.splitlines())


def test_freeze_and_unfreeze_patterns():
    model = float32_model()
    names = list(model.named_parameters())
    model.freeze("blocks.*.attn.*", "embed.W_pos")
    frozen = {n for n, p in model.named_parameters().items() if not p.trainable}
    assert frozen == {n for n in names if ".attn." in n} | {"embed.W_pos"}
    model.unfreeze("blocks.1.*")
    frozen = {n for n, p in model.named_parameters().items() if not p.trainable}
    assert frozen == {n for n in names if n.startswith("blocks.0.attn.")} | {"embed.W_pos"}
    model.freeze()
    assert model.num_parameters(trainable_only=True) == 0
    model.unfreeze()
    assert model.num_parameters(trainable_only=True) == model.num_parameters()
    # freezing forgets a gradient already there
    ids, _ = ids_and_mask()
    model.loss(ids, ids, backward=True)
    assert model.named_parameters()["lm_head.W"].grad is not None
    model.freeze("lm_head.*")
    assert model.named_parameters()["lm_head.W"].grad is None


def test_train_adapter_freezes_everything_else():
    model = float32_model(n_classes=2)
    model.add_adapter("a", AdapterConfig(bottleneck=4), n_classes=2)
    model.add_adapter("b", AdapterConfig(bottleneck=4), n_classes=2)
    model.train_adapter("b")
    assert model.active_adapter == "b"
    trainable = {n for n, p in model.named_parameters().items() if p.trainable}
    assert trainable == {n for n in model.named_parameters() if n.startswith("adapters.b.")}
