"""The trainer: what each method trains, reproducibility, learning, best weights, early stopping."""
import dataclasses

import numpy as np
import pytest

from minitransformer import AdapterConfig, LoRAConfig, ModelConfig, PrefixConfig, PromptConfig, Transformer
from minitransformer.tools import data, train


def tiny_model(seed=0, norm="post"):
    cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=16, n_heads=2,
                      n_layers=2, d_ff=32, norm=norm, pooling="mean", dropout=0.1)
    return Transformer(cfg, seed)


def tiny_task(n_train=256, seed=0):
    """Label 1 when the text holds the word `a` (singular determiner): a bag-of-words task."""
    corpus = data.pretraining_corpus(n_train + 128, seed)
    labels = (corpus.ids == data.DET_SING).any(axis=1).astype(np.int64)
    split = data.Split(corpus.ids, corpus.pad_mask, labels)
    return data.Task("tiny", 2, "contains 'a'", split[:n_train], split[n_train:], split[n_train:])


def trainable(model):
    return sorted(n for n, p in model.named_parameters().items() if p.trainable)


FAST = dict(steps=30, batch_size=16, eval_every=10, progress=False)


# ----------------------------------------------------------------------------- prepare


def test_prepare_methods_train_what_they_say():
    m = tiny_model()
    assert train.prepare(m, "head", 3) == "head only"
    assert trainable(m) == ["cls_head.W", "cls_head.b"]
    assert m.cls_head.p["W"].value.shape == (16, 3)

    m = tiny_model()
    train.prepare(m, "adapter", 2, adapter_config=AdapterConfig(bottleneck=4), name="t")
    names = trainable(m)
    assert names and all(n.startswith("adapters.t.") for n in names)
    assert "adapters.t.blocks.1.ffn.W_down" in names and "adapters.t.ln_emb.gamma" in names
    assert m.active_adapter == "t"

    m = tiny_model()
    train.prepare(m, "layernorm", 2)
    assert all(n.startswith("cls_head.") or n.endswith((".gamma", ".beta")) for n in trainable(m))
    assert len(trainable(m)) == 2 + 2 * (1 + 2 * 2)  # head, ln_emb, 2 per block

    m = tiny_model(norm="pre")
    train.prepare(m, "top_k", 2, k=1)
    names = trainable(m)
    assert all(n.startswith(("blocks.1.", "cls_head.", "ln_f.")) for n in names)
    assert "ln_f.gamma" in names and "blocks.1.attn.W_q" in names

    m = tiny_model()
    assert train.prepare(m, "full", 2) == "full fine-tuning"
    assert set(trainable(m)) == {n for n in m.named_parameters() if not n.startswith("lm_head.")}


@pytest.mark.parametrize("method, config, label, leaves", [
    ("lora", LoRAConfig(r=2), "LoRA (r=2, q,v)", {"A_q", "B_q", "A_v", "B_v"}),
    ("prefix", None, "prefix (n=8, MLP)", {"P0", "W_1", "b_1", "W_2", "b_2"}),
    ("prefix", PrefixConfig(n_prefix=3, reparameterize=False), "prefix (n=3)", {"P_k", "P_v"}),
    ("prompt", PromptConfig(n_prompt=5), "prompt (n=5)", {"P"}),
    ("bitfit", None, "BitFit", {"b_q", "b_k", "b_v", "b_o", "b_1", "b_2", "beta"}),
])
def test_prepare_the_other_methods(method, config, label, leaves):
    m = tiny_model()
    assert train.prepare(m, method, 2, adapter_config=config, name="t") == label
    names = trainable(m)
    assert m.active_adapter == "t" and all(n.startswith("adapters.t.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == leaves | {"W", "b"}  # and the head's


def test_prepare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method.*adapter.*'dora'"):
        train.prepare(tiny_model(), "dora", 2)
    with pytest.raises(ValueError, match="adapter_config: expected a LoRAConfig for method 'lora', got PromptConfig"):
        train.prepare(tiny_model(), "lora", 2, adapter_config=PromptConfig())
    with pytest.raises(ValueError, match="adapter_config: only used by the methods .*, got it with 'full'"):
        train.prepare(tiny_model(), "full", 2, adapter_config=AdapterConfig())
    with pytest.raises(ValueError, match=r"k: expected an integer in \[0, 2\]"):
        train.prepare(tiny_model(), "top_k", 2, k=3)
    with pytest.raises(ValueError, match="k: only used"):
        train.prepare(tiny_model(), "full", 2, k=1)
    with pytest.raises(ValueError, match="n_classes"):
        train.prepare(tiny_model(), "head", 1)


def test_train_config_rejects_bad_values():
    for field, bad in (("steps", 0), ("batch_size", -1), ("lr", 0.0), ("patience", 0), ("clip", -1.0)):
        with pytest.raises(ValueError, match=field):
            train.TrainConfig(**{field: bad})


# ----------------------------------------------------------------------------- fit


def test_same_seed_same_history_and_weights():
    task = tiny_task()
    runs = []
    for seed in (0, 0, 1):
        m = tiny_model()
        train.prepare(m, "full", 2)
        h = train.fit(m, task, train.TrainConfig(seed=seed, **FAST))
        runs.append((dataclasses.replace(h, seconds=0.0), m.named_parameters()["blocks.0.attn.W_q"].value))
    (h0, w0), (h1, w1), (h2, w2) = runs
    assert h0 == h1 and np.array_equal(w0, w1)
    assert h0.loss != h2.loss  # another seed: other batches, other dropout masks
    assert len(h0.steps) == 30 and h0.eval_steps == [9, 19, 29]


def test_fit_learns_a_tiny_task_and_keeps_the_best_weights():
    task = tiny_task()
    m = tiny_model()
    train.prepare(m, "full", 2)
    h = train.fit(m, task, train.TrainConfig(steps=100, batch_size=32, lr=3e-2, warmup=10,
                                             eval_every=20, progress=False))
    assert np.mean(h.loss[-20:]) < 0.5 * np.mean(h.loss[:20])
    assert h.best_val_acc >= 0.9
    assert h.best_val_acc == max(h.val_acc)
    assert train.accuracy(m, task.val) == h.best_val_acc  # the best weights were restored


def test_adapter_fit_leaves_the_base_untouched():
    task = tiny_task()
    m = tiny_model()
    before = {n: p.value.copy() for n, p in m.named_parameters().items()}
    train.prepare(m, "adapter", 2, adapter_config=AdapterConfig(bottleneck=4))
    W_up = m.named_parameters()["adapters.task.blocks.0.attn.W_up"]
    start = W_up.value.copy()
    train.fit(m, task, train.TrainConfig(**FAST))
    for n, v in before.items():
        assert np.array_equal(m.named_parameters()[n].value, v), n
    assert not np.array_equal(W_up.value, start)  # while the adapter did train


def test_early_stopping():
    task = tiny_task()
    m = tiny_model()
    train.prepare(m, "head", 2)
    # a learning rate this small cannot change the validation accuracy: no new best, ever
    h = train.fit(m, task, train.TrainConfig(steps=100, lr=1e-12, eval_every=5, patience=2,
                                             batch_size=8, progress=False))
    assert h.eval_steps == [4, 9, 14] and len(h.steps) == 15
    assert h.best_step == 4


def test_fit_needs_something_to_train():
    m = tiny_model()
    m.add_classifier(2)
    m.freeze()
    with pytest.raises(ValueError, match="trainable"):
        train.fit(m, tiny_task(), train.TrainConfig(**FAST))
