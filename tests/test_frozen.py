"""Training an adapter (or LoRA, a prefix, a prompt, BitFit) leaves the frozen base bit-identical,
and a frozen weight's gradient is skipped, not computed and thrown away, on the reference path
and on the fast one."""
import hashlib

import numpy as np
import pytest
from conftest import snapshot

from minitransformer import (AdapterConfig, BitFitConfig, LoRAConfig, ModelConfig, PrefixConfig, PromptConfig,
                             Transformer, adapters, attention, backend, modules, peft)
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
    """Wrap fn_name wherever a pass looks it up with a wrapper that records its arguments and
    calls the function it replaces: backend.ops (the containers), and the modules whose passes
    call it by name (attention.py, adapters.py, peft.py; the kernels on the fast path)."""
    from minitransformer.tools import kernels, kernels_attention

    def wrap(real):
        def wrapper(*args, **kwargs):
            record(args, kwargs)
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(backend.ops, fn_name, wrap(getattr(backend.ops, fn_name)))
    for mod in (attention, adapters, peft, kernels, kernels_attention):  # kernels_attention: peft.lora_*
        if hasattr(mod, fn_name):
            monkeypatch.setattr(mod, fn_name, wrap(getattr(mod, fn_name)))


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


# ----------------------------------------------------------------------------- the other methods

METHODS = {"lora": LoRAConfig(r=2, targets=("q", "k", "v", "o", "ffn1", "ffn2")),
           "lora_qv": LoRAConfig(r=4),
           "prefix": PrefixConfig(n_prefix=3, reparameterize=False),
           "prefix_mlp": PrefixConfig(n_prefix=3, hidden=8),
           "prompt": PromptConfig(n_prompt=3),
           "bitfit": BitFitConfig()}


def sha256_of_base(model):
    """One digest over every base array's name and bytes."""
    h = hashlib.sha256()
    for n, p in model.named_parameters().items():
        if not n.startswith("adapters."):
            h.update(n.encode())
            h.update(p.value.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_leaves_the_base_bit_identical(norm, method, real_batch, path):
    model = base_model(norm)
    model.add_adapter("topic", METHODS[method], n_classes=4, seed=1)
    model.train_adapter("topic")
    params = model.named_parameters()
    trainable = {n for n, p in params.items() if p.trainable}
    assert trainable == {n for n in params if n.startswith("adapters.topic.")}
    before, digest = snapshot(model), sha256_of_base(model)
    opt = AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        opt.zero_grad()
        model.loss(real_batch.ids, real_batch.labels, real_batch.pad_mask, head="cls", train=True, rng=rng,
                   backward=True)
        for n, p in params.items():  # after every backward: frozen grads were never computed
            assert (p.grad is None) == (n not in trainable), n
        opt.step()
    after = snapshot(model)
    assert sha256_of_base(model) == digest
    assert all(after[n] == before[n] for n in params if n not in trainable)
    assert all(after[n] != before[n] for n in trainable)  # and everything the task trains moved


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_skips_the_frozen_weight_gradients(monkeypatch, norm, method, real_batch, path):
    """Record every linear, LoRA, LayerNorm and embedding backward call: the only weight
    gradients asked for are the task's (head, prefix MLP, LoRA's A and B, BitFit's copies)."""
    model = base_model(norm)
    s = model.add_adapter("topic", METHODS[method], n_classes=4, seed=1)
    model.train_adapter("topic")
    params = model.named_parameters()
    by_id = {id(p.value): n for n, p in params.items()}
    linear, lora, ln, emb = [], [], [], []
    spy(monkeypatch, "linear_backward", lambda a, k: linear.append(
        (by_id[id(a[1][1])], k.get("need_dW", True), k.get("need_db", True))))
    spy(monkeypatch, "lora_backward", lambda a, k: lora.append(
        (by_id[id(a[1][1])], k.get("need_dA", True), k.get("need_dB", True))))
    spy(monkeypatch, "layernorm_backward", lambda a, k: ln.append(
        (k.get("need_dgamma", True), k.get("need_dbeta", True))))
    for fn in ("embedding_backward", "position_backward"):
        spy(monkeypatch, fn, lambda a, k: emb.append(a))
    model.loss(real_batch.ids, real_batch.labels, real_batch.pad_mask, head="cls", backward=True)

    trainable = {n for n, p in params.items() if p.trainable}
    local = {n[len("adapters.topic."):] for n in trainable}
    asked_dW = {n for n, need_dW, _ in linear if need_dW}
    assert asked_dW == {n for n in trainable if n.rsplit(".", 1)[1] in ("W", "W_1", "W_2")}  # the task's own
    asked_db = {n.rsplit(".", 1)[0] + ".b" + n.rsplit(".", 1)[1][1:] for n, _, need_db in linear if need_db}
    asked_db = {n[len("adapters.topic."):] if n.startswith("adapters.") else n for n in asked_db}
    assert asked_db == {n for n in local if n.rsplit(".", 1)[1] in ("b", "b_q", "b_k", "b_v", "b_o", "b_1", "b_2")}
    assert all(not n.startswith("adapters.") for n, need_dW, _ in linear if not need_dW)  # frozen: dx only
    assert len(linear) > len(asked_dW)  # the frozen layers were gone through, for dx only
    if s.method == "lora":
        assert {n for n, _, _ in lora} == {n for n in trainable if ".lora.A_" in n}
        assert all(need_dA and need_dB for _, need_dA, need_dB in lora)
    else:
        assert lora == []
    assert not any(need_dgamma for need_dgamma, _ in ln)  # no method here trains a gamma
    assert all(need_dbeta == (s.method == "bitfit") for _, need_dbeta in ln)
    assert emb == []  # the frozen embeddings: no scatter-add at all
    assert all(p.grad is None for p in params.values() if not p.trainable)
    assert all(p.grad is not None for p in params.values() if p.trainable)
