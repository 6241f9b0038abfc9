"""sizes.py: the parameter count is exact, the memory estimate is within a factor of two of what
a training step really allocates, and check_fits refuses what exceeds the memory available."""
import tracemalloc

import numpy as np
import pytest

from minitransformer import AdapterConfig, ModelConfig, Transformer, sizes
from minitransformer.optim import AdamW
from minitransformer.peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig
from minitransformer.tools import pretrain


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("n_classes", [0, 3])
@pytest.mark.parametrize("adapter", [None, AdapterConfig(bottleneck=3),
                                     AdapterConfig(bottleneck=5, placement="ffn", train_layernorm=False),
                                     AdapterConfig(reduction_factor=2, placement="parallel")])
def test_parameter_count_matches_the_model(norm, n_classes, adapter):
    cfg = ModelConfig(vocab_size=13, max_len=7, d_model=8, n_heads=2, n_layers=3, d_ff=20, norm=norm,
                      n_classes=n_classes)
    model = Transformer(cfg)
    expected = sizes.parameter_count(cfg)
    if adapter is not None:
        model.add_adapter("task", adapter, n_classes=4)
        expected += sizes.adapter_parameter_count(cfg, adapter, 4)
    assert model.num_parameters() == expected


def test_the_shipped_base_has_214883_parameters():
    assert sizes.parameter_count(pretrain.BASE_CONFIG) == 214_883


@pytest.mark.parametrize("m", [None, 8, 2048])  # full training; a small and a very wide adapter
def test_step_estimate_is_within_a_factor_of_two_of_the_measured_peak(m):
    cfg = ModelConfig(vocab_size=99, max_len=32, d_model=64, n_heads=4, n_layers=2, d_ff=256)
    B, T = 16, 32
    tracemalloc.start()  # NumPy reports its arrays to tracemalloc
    model = Transformer(cfg)
    adapter = AdapterConfig(bottleneck=m) if m else None
    if adapter:
        model.add_adapter("task", adapter, n_classes=2)
        model.train_adapter("task")
    else:
        model.add_classifier(2)
    opt = AdamW(model.parameters(trainable_only=True))
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 99, (B, T)), rng.integers(0, 2, B)
    for _ in range(2):  # the second step has AdamW's moments allocated
        opt.zero_grad()
        model.loss(ids, labels, head="cls", backward=True)
        opt.step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = sizes.step_bytes(model.config, B, T, adapter, n_classes=2)
    assert 0.5 < estimate / peak < 2, (estimate, peak)


def test_check_fits_refuses_more_than_is_available(monkeypatch):
    sizes.check_fits(sizes.ALWAYS_FITS - 1, "small")  # never asks the system
    monkeypatch.setattr(sizes, "available_memory", lambda: 10 ** 9)
    sizes.check_fits(10 ** 9 - 1, "fits")
    with pytest.raises(ValueError, match=r"^x: m=5 needs about 2\.5 GB of memory, more than the 1\.0 GB available$"):
        sizes.check_fits(2.5e9, "x: m=5")
    monkeypatch.setattr(sizes, "available_memory", lambda: None)  # a system that does not tell
    sizes.check_fits(10 ** 15, "unknown")


def test_available_memory_is_a_positive_number_here():
    room = sizes.available_memory()
    assert room is None or room > 0


@pytest.mark.parametrize("config", [
    AdapterConfig(bottleneck=3), AdapterConfig(bottleneck=2, placement="ffn", train_layernorm=False),
    LoRAConfig(r=2), LoRAConfig(r=3, targets=("q", "k", "v", "o", "ffn1", "ffn2")),
    PrefixConfig(n_prefix=3), PrefixConfig(n_prefix=2, reparameterize=False), PromptConfig(n_prompt=4),
    BitFitConfig(), BitFitConfig(biases=("q", "ffn1"), layernorm=False)], ids=repr)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_every_methods_count_is_the_parameters_it_creates(config, norm):
    cfg = ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=2, d_ff=16, norm=norm)
    model = Transformer(cfg)
    task = model.add_adapter("task", config, n_classes=3)
    assert sizes.adapter_parameter_count(cfg, config, 3) == sum(p.value.size for p in task.parameters())
