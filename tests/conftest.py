"""Shared helpers for the tests: small models at a generic point, batches, snapshots.

Gradient checks run in float64 on tiny models (d_model 8, 2 layers) whose weights are drawn with
init_std 0.3 and whose LayerNorm parameters are moved off 1 and 0 (see gradcheck.py's docstring:
at the usual 0.02 init many gradients sink to the round-off floor and a check proves little).
"""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import settings

import minitransformer.tools  # noqa: F401  installs the fast path, which many tests compare
from minitransformer import AdapterConfig, Transformer
from minitransformer.gradcheck import CHECK_CONFIG

# CI runs the same examples every time (a failure found once is found again, never flaky);
# run `pytest --hypothesis-profile=explore` locally to search new configurations.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


def small_config(**overrides):
    """The tiny float64 config of the gradient checks (gradcheck.CHECK_CONFIG); any field can be
    overridden."""
    return replace(CHECK_CONFIG, **overrides)


def move_layernorms(model, seed=100):
    """Move every LayerNorm's gamma off 1 and beta off 0 (base and per-task copies)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters().items():
        if name.endswith((".gamma", ".beta")):
            p.value += 0.3 * rng.standard_normal(p.value.shape)


def generic_model(seed=0, adapter=None, **overrides):
    """A float64 model at a generic point; adapter: an AdapterConfig to add as task "task" and train."""
    model = Transformer(small_config(**overrides), seed=seed)
    if adapter is not None:
        model.add_adapter("task", adapter, n_classes=3, seed=seed + 1)
    move_layernorms(model, seed + 100)
    if adapter is not None:
        model.train_adapter("task")
    return model


def generic_adapter(**overrides):
    """An AdapterConfig with large weights (a generic point for gradient checks)."""
    fields = dict(bottleneck=3, init_std=0.3)
    fields.update(overrides)
    return AdapterConfig(**fields)


def batch(config, B=3, T=6, seed=1, head="lm", padded=True):
    """ids (B, T), targets, pad_mask (B, T) with the second sequence padded after position 3."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (B, T))
    pad_mask = np.ones((B, T), bool)
    if padded:
        pad_mask[1 % B, 4:] = False
    if head == "lm":
        targets = rng.integers(0, config.vocab_size, (B, T))
        targets[~pad_mask] = -100  # padded positions do not count
    else:
        targets = rng.integers(0, 3, B)
    return ids, targets, pad_mask if padded else None


def snapshot(model):
    """{name: bytes of the value}: compare two snapshots to prove arrays bit-identical."""
    return {n: p.value.tobytes() for n, p in model.named_parameters().items()}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
