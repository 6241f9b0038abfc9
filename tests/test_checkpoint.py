"""Checkpoints round-trip bit for bit, adapter files are small, every bad
file is refused with a clear CheckpointError and leaves the model untouched, and a failed save
leaves the previous file intact."""
import json
import os

import numpy as np
import pytest
from conftest import snapshot

from minitransformer import (AdapterConfig, BitFitConfig, LoRAConfig, ModelConfig, PrefixConfig, PromptConfig,
                             Transformer)
from minitransformer.tools.checkpoint import CheckpointError, load_adapter, load_base, save_adapter, save_base


def make_model(dtype="float32", **overrides):
    fields = dict(vocab_size=13, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32, n_classes=3,
                  dtype=dtype)
    fields.update(overrides)
    return Transformer(ModelConfig(**fields), seed=0)


def trained(model, name="task", placement="houlsby", train_layernorm=True, seed=1):
    """Add adapter `name` and move every one of its arrays off its init (as training would)."""
    model.add_adapter(name, AdapterConfig(bottleneck=4, placement=placement, train_layernorm=train_layernorm),
                      n_classes=2, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.adapters[name].parameters():
        p.value += rng.standard_normal(p.value.shape).astype(p.value.dtype)
    return model


def ids_and_mask():
    ids = np.random.default_rng(0).integers(0, 13, (3, 6))
    pad = np.ones((3, 6), bool)
    pad[2, 4:] = False
    return ids, pad


def rewrite(src, dst, drop=(), replace=None, extra=None):
    """Copy an .npz checkpoint, dropping or replacing entries (the way a bad file comes about)."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(replace or {})
    arrays.update(extra or {})
    np.savez(dst, **arrays)
    return dst


def untouched(model, before, adapters_before):
    return snapshot(model) == before and list(model.adapters) == adapters_before


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_base_round_trip_is_bit_identical(tmp_path, dtype, norm):
    model = make_model(dtype, norm=norm)
    save_base(model, tmp_path / "base.npz")
    loaded = load_base(tmp_path / "base.npz")
    assert loaded.config == model.config
    assert snapshot(loaded) == snapshot(model)
    assert all(p.value.dtype == np.dtype(dtype) for p in loaded.parameters())
    ids, pad = ids_and_mask()
    assert np.array_equal(loaded.forward(ids, pad, head="cls")[0], model.forward(ids, pad, head="cls")[0])


def test_base_with_classifier_added_later_round_trips(tmp_path):
    model = make_model(n_classes=0)
    model.add_classifier(5, seed=3)
    save_base(model, tmp_path / "base.npz")
    loaded = load_base(tmp_path / "base.npz")
    assert snapshot(loaded) == snapshot(model) and loaded.cls_head.p["W"].value.shape == (16, 5)


def test_save_base_leaves_adapters_out(tmp_path):
    model = trained(make_model())
    save_base(model, tmp_path / "base.npz")
    with np.load(tmp_path / "base.npz", allow_pickle=False) as z:
        assert not any(k.startswith("adapters.") for k in z.files)
        assert set(z.files) - {"__meta__"} == {n for n in model.named_parameters() if not n.startswith("adapters.")}


@pytest.mark.parametrize("placement, train_layernorm", [("houlsby", True), ("ffn", False), ("parallel", True)])
def test_adapter_round_trip_is_bit_identical(tmp_path, placement, train_layernorm):
    model = trained(make_model(), placement=placement, train_layernorm=train_layernorm)
    save_base(model, tmp_path / "base.npz")
    save_adapter(model, "task", tmp_path / "task.npz")
    other = load_base(tmp_path / "base.npz")
    assert load_adapter(other, tmp_path / "task.npz") == "task"
    assert snapshot(other) == snapshot(model)
    assert other.adapters["task"].config == model.adapters["task"].config
    model.set_active_adapter("task")
    other.set_active_adapter("task")
    ids, pad = ids_and_mask()
    for head in ("lm", "cls"):
        assert np.array_equal(other.forward(ids, pad, head=head)[0], model.forward(ids, pad, head=head)[0])
    assert load_adapter(other, tmp_path / "task.npz", name="again") == "again"  # under another name
    a, b = other.adapters["task"].parameters(), other.adapters["again"].parameters()
    assert all(p.value.tobytes() == q.value.tobytes() for p, q in zip(a, b))


def test_adapter_file_is_a_small_fraction_of_the_base(tmp_path):
    model = trained(make_model(vocab_size=99, max_len=32, d_model=64, d_ff=256))
    save_base(model, tmp_path / "base.npz")
    save_adapter(model, "task", tmp_path / "task.npz")
    n_base = sum(p.value.size for n, p in model.named_parameters().items() if not n.startswith("adapters."))
    n_task = sum(p.value.size for p in model.adapters["task"].parameters())
    ratio = os.path.getsize(tmp_path / "task.npz") / os.path.getsize(tmp_path / "base.npz")
    # measured (d_model 64, m = 4, 2 layers): 3,090 of 115,110 parameters (2.7 %); files of
    # 21,720 and 472,420 bytes (4.6 %): every array in the file carries a small header
    assert n_task / n_base < 0.04
    assert ratio < 0.08


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def files(tmp_path):
    """A base and a trained adapter saved from it; the target model is loaded from the base."""
    source = trained(make_model())
    save_base(source, tmp_path / "base.npz")
    save_adapter(source, "task", tmp_path / "task.npz")
    return tmp_path


BAD_ADAPTERS = {
    "wrong shape": (dict(replace={"blocks.0.attn.W_down": np.zeros((16, 5), np.float32)}),
                    r"key 'blocks.0.attn.W_down' has shape \(16, 5\) in the file, but the model expects \(16, 4\)"),
    "missing key": (dict(drop=("head.b",)), r"missing key 'head.b' \(expected shape \(2,\)\)"),
    "unexpected key": (dict(extra={"blocks.9.attn.W_down": np.zeros((16, 4), np.float32)}),
                       r"unexpected key 'blocks.9.attn.W_down' with shape \(16, 4\)"),
    "integer array": (dict(replace={"head.b": np.zeros(2, np.int64)}),
                      r"key 'head.b' expected a float array, got dtype int64"),
    "no meta": (dict(drop=("__meta__",)), r"expected a '__meta__' entry"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_file_is_refused_and_model_untouched(files, case):
    change, message = BAD_ADAPTERS[case]
    bad = rewrite(files / "task.npz", files / "bad.npz", **change)
    model = load_base(files / "base.npz")
    trained(model, "other")  # an adapter already there must survive too
    before, names = snapshot(model), list(model.adapters)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, bad)
    assert untouched(model, before, names)


@pytest.mark.parametrize("field, value", [("d_model", 32), ("n_layers", 3), ("norm", "pre")])
def test_adapter_for_another_base_is_refused(files, field, value):
    cfg = load_base(files / "base.npz").config.to_dict()
    model = Transformer(ModelConfig(**{**cfg, field: value}), seed=0)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=rf"trained on a base with {field}=.*but the model has {field}="):
        load_adapter(model, files / "task.npz")
    assert untouched(model, before, [])


def test_adapter_name_clash_is_refused(files):
    model = load_base(files / "base.npz")
    load_adapter(model, files / "task.npz")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"name: the model already has an adapter called 'task'"):
        load_adapter(model, files / "task.npz")
    assert untouched(model, before, ["task"])


def test_truncated_file_is_refused(files):
    data = (files / "task.npz").read_bytes()
    (files / "cut.npz").write_bytes(data[:len(data) // 2])
    model = load_base(files / "base.npz")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"not a readable .npz checkpoint, truncated or corrupt"):
        load_adapter(model, files / "cut.npz")
    with pytest.raises(CheckpointError, match=r"not a readable .npz checkpoint"):
        load_base(files / "cut.npz")
    assert untouched(model, before, [])


@pytest.mark.parametrize("content", ["npy", "text", "empty"])
def test_a_file_that_is_no_npz_archive_is_refused(files, content):
    bad = files / "bad.npz"
    if content == "npy":  # a single array saved with np.save, then renamed
        with open(bad, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        bad.write_bytes(b"" if content == "empty" else b"weights, honest")
    model = load_base(files / "base.npz")
    before = snapshot(model)
    for load in (lambda path: load_adapter(model, path), load_base):
        with pytest.raises(CheckpointError, match=r"not a readable .npz checkpoint, truncated or corrupt"):
            load(bad)
    assert untouched(model, before, [])


@pytest.mark.parametrize("meta, message", [("{oops", r"'__meta__' is not valid JSON"),
                                           ("[1, 2]", r"'__meta__' expected a JSON object, got list")])
def test_bad_meta_is_refused(files, meta, message):
    bad = rewrite(files / "task.npz", files / "bad.npz", replace={"__meta__": np.array(meta)})
    model = load_base(files / "base.npz")
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, bad)
    assert model.adapters == {}


class Trap:
    """Unpickling this object would create the file `marker`: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_array_is_refused_never_unpickled(files):
    marker = files / "unpickled.txt"
    bad = rewrite(files / "task.npz", files / "evil.npz",
                  replace={"head.W": np.array([Trap(marker)], dtype=object)})
    model = load_base(files / "base.npz")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"holds a pickled object; refusing to unpickle"):
        load_adapter(model, bad)
    assert not marker.exists()
    assert untouched(model, before, [])


def test_missing_file_and_wrong_format_are_refused(files):
    model = load_base(files / "base.npz")
    with pytest.raises(CheckpointError, match=r"path: expected an existing checkpoint file, got '.*nope.npz'"):
        load_adapter(model, files / "nope.npz")
    with pytest.raises(CheckpointError, match=r"expected format 'minitransformer-adapter', got 'minitransformer-base'"):
        load_adapter(model, files / "base.npz")
    with pytest.raises(CheckpointError, match=r"expected format 'minitransformer-base', got 'minitransformer-adapter'"):
        load_base(files / "task.npz")


def test_bad_base_file_is_refused_and_model_untouched(files):
    bad = rewrite(files / "base.npz", files / "bad.npz", replace={"embed.W_tok": np.zeros((13, 8), np.float32)})
    with pytest.raises(CheckpointError, match=r"key 'embed.W_tok' has shape \(13, 8\) in the file, "
                                              r"but the model expects \(13, 16\)"):
        load_base(bad)
    model = make_model()
    model.named_parameters()["blocks.1.ffn.W_1"].value += 1  # differs from the file
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"key 'embed.W_tok' has shape \(13, 8\)"):
        load_base(bad, model)
    assert untouched(model, before, [])
    other = make_model(n_layers=3)
    other_before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"n_layers is 2 in the file, but 3 in the model"):
        load_base(files / "base.npz", other)
    assert untouched(other, other_before, [])
    missing = rewrite(files / "base.npz", files / "missing.npz", drop=("blocks.1.ln2.beta",))
    with pytest.raises(CheckpointError, match=r"missing key 'blocks.1.ln2.beta' \(expected shape \(16,\)\)"):
        load_base(missing, model)
    assert untouched(model, before, [])


# ----------------------------------------------------------------------------- failed saves


@pytest.mark.parametrize("what", ["base", "adapter"])
def test_failed_save_leaves_the_previous_file_intact(files, monkeypatch, what):
    target = files / ("base.npz" if what == "base" else "task.npz")
    previous = target.read_bytes()
    listing = sorted(os.listdir(files))
    model = trained(make_model(), seed=7)  # different weights from what the file holds
    model.named_parameters()["embed.W_tok"].value += 1

    def half_written(f, *args, **kwargs):
        f.write(b"PK\x03\x04 half an archive")  # bytes reach the disk, then the writer dies
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_base(model, target) if what == "base" else save_adapter(model, "task", target)
    assert target.read_bytes() == previous
    assert sorted(os.listdir(files)) == listing  # no temporary file left behind
    monkeypatch.undo()
    loaded = load_base(files / "base.npz")  # and the old file still loads
    if what == "adapter":
        load_adapter(loaded, target)


# ----------------------------------------------------------------------------- the other methods

PEFT_CONFIGS = {"lora": LoRAConfig(r=2, targets=("q", "v", "ffn2"), init="gaussian"),
                "prefix": PrefixConfig(n_prefix=3, reparameterize=False),
                "prefix_mlp": PrefixConfig(n_prefix=2, hidden=6),
                "prompt": PromptConfig(n_prompt=3),
                "bitfit": BitFitConfig(biases=("q", "o", "ffn1"))}


def meta_of(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["__meta__"]))


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_every_method_round_trips_bit_identical(tmp_path, method):
    model = make_model()
    s = model.add_adapter("task", PEFT_CONFIGS[method], n_classes=2, seed=1)
    rng = np.random.default_rng(1)
    for p in s.parameters():  # off the init, as training would move them
        p.value += rng.standard_normal(p.value.shape).astype(p.value.dtype)
    save_base(model, tmp_path / "base.npz")
    save_adapter(model, "task", tmp_path / "task.npz")
    meta = meta_of(tmp_path / "task.npz")
    assert meta["method"] == s.method and type(s.config)(**meta["adapter_config"]) == s.config
    other = load_base(tmp_path / "base.npz")
    assert load_adapter(other, tmp_path / "task.npz") == "task"
    assert other.adapters["task"].config == s.config and other.adapters["task"].method == s.method
    assert snapshot(other) == snapshot(model)
    model.set_active_adapter("task")
    other.set_active_adapter("task")
    ids, pad = ids_and_mask()
    for head in ("lm", "cls"):
        assert np.array_equal(other.forward(ids, pad, head=head)[0], model.forward(ids, pad, head=head)[0])


def test_a_merged_lora_task_saves_its_own_matrices_but_the_base_waits(tmp_path):
    model = make_model()
    model.add_adapter("task", LoRAConfig(), n_classes=2)
    model.merge("task")
    save_adapter(model, "task", tmp_path / "task.npz")  # A and B: unchanged by merging
    with pytest.raises(CheckpointError, match=r"task 'task' is merged into the base weights; "
                                              r"model.unmerge\('task'\) before saving the base"):
        save_base(model, tmp_path / "base.npz")
    assert not (tmp_path / "base.npz").exists()
    model.unmerge("task")
    save_base(model, tmp_path / "base.npz")
    other = load_base(tmp_path / "base.npz")
    load_adapter(other, tmp_path / "task.npz")
    assert snapshot(other) == snapshot(model)


def test_a_file_without_method_loads_as_adapters(files):
    """Adapter files written before the other methods existed have no 'method': adapters."""
    meta = meta_of(files / "task.npz")
    del meta["method"]
    old = rewrite(files / "task.npz", files / "old.npz", replace={"__meta__": np.array(json.dumps(meta))})
    model = load_base(files / "base.npz")
    load_adapter(model, old)
    assert model.adapters["task"].method == "adapter"


@pytest.mark.parametrize("change, message", [
    (dict(method="dora"), r"method expected one of \('adapter', 'lora', 'prefix', 'prompt', 'bitfit'\), got 'dora'"),
    (dict(method="lora"), r"adapter_config is not valid \(LoRAConfig.__init__\(\) got an unexpected keyword"),
    (dict(method="lora", adapter_config={"r": 0}), r"adapter_config is not valid \(r: expected a positive integer, got 0\)"),
    (dict(method="prompt", adapter_config={"n_prompt": 2}), r"missing key 'prompt.P'"),
    (dict(adapter_config=[1]), r"adapter_config expected a JSON object, got list"),
])
def test_a_wrong_method_or_config_is_refused_and_model_untouched(files, change, message):
    meta = {**meta_of(files / "task.npz"), **change}
    bad = rewrite(files / "task.npz", files / "bad.npz", replace={"__meta__": np.array(json.dumps(meta))})
    model = load_base(files / "base.npz")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, bad)
    assert untouched(model, before, [])
