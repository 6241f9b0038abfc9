"""Training an adapter leaves the frozen base bit-identical, and a frozen weight's gradient is
skipped, not computed and thrown away, on the reference path and on the fast one."""
import numpy as np
import pytest
from conftest import snapshot

from minitransformer import AdapterConfig, ModelConfig, Transformer, adapters, attention, backend, modules
from minitransformer.tools import data
from minitransformer.optim import AdamW


@pytest.fixture(scope="module")
def real_batch():
    """16 texts of the project's synthetic corpus: [CLS] + words + PAD, labels = hidden topic."""
    return data.pretraining_corpus(16, seed=0)


def base_model(norm):
    cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=16, n_heads=2, n_layers=2,
                      d_ff=32, norm=norm, dropout=0.1, n_classes=4)
    return Transformer(cfg, seed=0)


@pytest.fixture(params=backend.PATHS)
def path(request):
    """Run the test on the reference path, then on the fast one."""
    with backend.using(request.param):
        yield request.param


def spy(monkeypatch, fn_name, record):
    """Wrap fn_name wherever the current path looks it up with a wrapper that records its
    arguments: backend.ops (the containers), and the modules whose passes call it by name
    (attention.py and adapters.py on the reference path, the kernels on the fast one)."""
    real = getattr(backend.ops, fn_name)

    def wrapper(*args, **kwargs):
        record(args, kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(backend.ops, fn_name, wrapper)
    if backend.current() == "fast":
        from minitransformer.tools import kernels
        if hasattr(kernels, fn_name):
            monkeypatch.setattr(kernels, fn_name, wrapper)  # kernels_attention calls kernels.<fn>
    else:
        for mod in (attention, adapters):
            if hasattr(mod, fn_name):
                monkeypatch.setattr(mod, fn_name, wrapper)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("placement, train_layernorm", [("houlsby", True), ("houlsby", False),
                                                         ("parallel", True), ("ffn", False)])
def test_adapter_training_leaves_the_base_bit_identical(norm, placement, train_layernorm, real_batch):
    model = base_model(norm)
    model.add_adapter("topic", AdapterConfig(bottleneck=4, placement=placement,
                                             train_layernorm=train_layernorm), n_classes=4, seed=1)
    model.train_adapter("topic")
    params = model.named_parameters()
    trainable = {n for n, p in params.items() if p.trainable}
    assert trainable == {n for n in params if n.startswith("adapters.topic.")}
    before = snapshot(model)
    opt = AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(4):
        opt.zero_grad()
        model.loss(real_batch.ids, real_batch.labels, real_batch.pad_mask, head="cls", train=True, rng=rng, backward=True)
        for n, p in params.items():  # after every backward: frozen grads were never computed
            assert (p.grad is None) == (n not in trainable), n
        opt.step()
    after = snapshot(model)
    assert all(after[n] == before[n] for n in params if n not in trainable)  # frozen: bit-identical
    assert all(after[n] != before[n] for n in trainable)  # every adapter array moved
    assert set(opt.state) == trainable and {p.name for p in opt.params} == trainable


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("train_layernorm", [True, False], ids=["paper", "adapterhub"])
def test_frozen_weight_gradients_are_skipped_not_computed(monkeypatch, norm, train_layernorm, real_batch, path):
    """Record every linear, LayerNorm and embedding backward call: no frozen weight asks for its gradient."""
    model = base_model(norm)
    model.add_adapter("topic", AdapterConfig(bottleneck=4, train_layernorm=train_layernorm), n_classes=4)
    model.train_adapter("topic")
    params = model.named_parameters()
    by_id = {id(p.value): n for n, p in params.items()}  # cache[1] of a linear is its W array itself
    linear_calls, ln_calls, embedding_calls = [], [], []

    def on_linear(args, kw):
        linear_calls.append((by_id[id(args[1][1])], kw.get("need_dx", True), kw.get("need_dW", True),
                             kw.get("need_db", True)))
    spy(monkeypatch, "linear_backward", on_linear)
    spy(monkeypatch, "layernorm_backward",
        lambda args, kw: ln_calls.append((by_id[id(args[1][2])], kw.get("need_dgamma", True))))
    for fn in ("embedding_backward", "position_backward"):
        spy(monkeypatch, fn, lambda args, kw: embedding_calls.append(args))

    model.loss(real_batch.ids, real_batch.labels, real_batch.pad_mask, head="cls", backward=True)

    def bias_of(W_name):  # blocks.0.attn.W_q -> blocks.0.attn.b_q, lm_head.W -> lm_head.b
        prefix, leaf = W_name.rsplit(".", 1)
        return f"{prefix}.{leaf.replace('W', 'b', 1)}"
    asked_dW = {n for n, _, need_dW, _ in linear_calls if need_dW}
    asked_db = {bias_of(n) for n, _, _, need_db in linear_calls if need_db}
    trainable_W = {n for n, p in params.items() if p.trainable and n.rsplit(".", 1)[1].startswith("W")}
    trainable_b = {n for n, p in params.items() if p.trainable and n.rsplit(".", 1)[1].startswith("b_")
                   or n.endswith("head.b") and p.trainable}
    assert asked_dW == trainable_W  # exactly the adapters' and the task head's matrices
    assert asked_db == trainable_b
    assert len(linear_calls) > len(asked_dW)  # the frozen layers were gone through, for dx only
    assert all(params[n].trainable == need for n, need in ln_calls)  # frozen LayerNorms: no dgamma
    assert {n for n, need in ln_calls if need} == {n for n, p in params.items()
                                                    if p.trainable and n.endswith(".gamma")}
    assert embedding_calls == []  # the frozen embeddings: no scatter-add at all
    called = {n: need_dx for n, need_dx, _, _ in linear_calls}
    if not train_layernorm:
        # AdapterHub setting: nothing under block 0's attention trains (embeddings and every
        # LayerNorm are frozen), so its input gradient is skipped and the whole Q/K/V backward with it
        assert called["blocks.0.attn.W_o"] is False
        assert not {"blocks.0.attn.W_q", "blocks.0.attn.W_k", "blocks.0.attn.W_v"} & set(called)
    else:  # a trained LayerNorm copy below block 0 (ln_emb, or ln1 in pre-LN) needs that gradient
        assert called["blocks.0.attn.W_q"] is True
    assert all(p.grad is None for p in params.values() if not p.trainable)
    assert all(p.grad is not None for p in params.values() if p.trainable)


def test_frozen_parameter_refuses_a_gradient():
    p = modules.Parameter("w", np.zeros(2), trainable=False)
    with pytest.raises(RuntimeError, match="w: a frozen parameter must not receive a gradient"):
        p.add_grad(np.ones(2))


def test_head_only_training_asks_only_for_the_head_gradient(monkeypatch, real_batch, path):
    """Only the base classifier trains: the only weight gradient computed is the head's, and the
    backward stops at the head (no input gradient, no block visited)."""
    model = base_model("post")
    model.freeze()
    model.unfreeze("cls_head.*")
    params = model.named_parameters()
    by_id = {id(p.value): n for n, p in params.items()}
    calls = []
    spy(monkeypatch, "linear_backward",
        lambda a, k: calls.append((by_id[id(a[1][1])], k.get("need_dx", True))))
    model.loss(real_batch.ids, real_batch.labels, real_batch.pad_mask, head="cls", backward=True)
    assert calls == [("cls_head.W", False)]
    assert {n for n, p in params.items() if p.grad is not None} == {"cls_head.W", "cls_head.b"}
