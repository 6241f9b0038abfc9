"""Save and load the base and single adapters as .npz files: validated, atomic, never unpickled.

A checkpoint is an .npz archive of named arrays plus one `__meta__` entry: a JSON string (stored
as a plain unicode array, so reading it needs no pickle) with the format, the version and the
configs needed to rebuild or validate the model.

    base file     every base parameter by its dotted name (embed.W_tok, blocks.0.attn.W_q, ...)
    adapter file  one task's parameters, named without the `adapters.<task>.` prefix
                  (blocks.0.attn.W_down, head.W, blocks.0.ln1.gamma when LayerNorms train;
                  blocks.0.lora.A_q, prompt.P, ... for the other methods, see tasks.py), and in
                  `__meta__` the method ("adapter", "lora", "prefix", "prompt", "bitfit") with
                  its config, validated by that method's config class on loading

Safety:
- writes go to a temporary file in the same folder, flushed to disk, then renamed over the
  target in one step (files.atomic_write): a crash mid-write leaves the previous file as it was;
- loading uses np.load(allow_pickle=False): a pickled object is refused, never executed;
- everything is validated (keys, shapes, dtypes, finite values, configs) before the first array
  is assigned, so a bad file leaves the model untouched.
"""
import json
import zipfile
from pathlib import Path

import numpy as np

from ..model import ModelConfig, Transformer
from ..tasks import METHODS, Task
from .files import atomic_write

VERSION = 1
BASE_FORMAT = "minitransformer-base"
ADAPTER_FORMAT = "minitransformer-adapter"
# the base's config fields an adapter depends on: a mismatch in any of them is refused
ADAPTER_BASE_FIELDS = ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "norm", "pooling")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------- files


def _atomic_savez(path, arrays, meta):
    """Write arrays and meta to `path` atomically (files.atomic_write)."""
    atomic_write(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays))


def file_format(path):
    """The format of the checkpoint at `path` (BASE_FORMAT, ADAPTER_FORMAT), or None when it
    is not a readable checkpoint: what an output path may be overwritten with."""
    try:
        meta, _ = _read(path, expected_format=None)
    except CheckpointError:
        return None
    return meta.get("format")


def _read(path, expected_format):
    """-> (meta dict, {name: array}). Raises CheckpointError for anything unreadable, or of
    another format than `expected_format` (None: any)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"path: expected an existing checkpoint file, got {str(path)!r}")
    if not zipfile.is_zipfile(path):  # else np.load would take a .npy for one array, other bytes for a pickle
        raise CheckpointError(f"{path}: not a readable .npz checkpoint, truncated or corrupt "
                              "(no zip archive found)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(f"{path}: holds a pickled object; refusing to unpickle "
                                  "(checkpoints contain plain numeric arrays only)") from e
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({e})") from e
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint, truncated or corrupt ({e})") from e
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path}: expected a '__meta__' entry, got keys {sorted(arrays)[:5]}...")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: '__meta__' is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: '__meta__' expected a JSON object, got {type(meta).__name__}")
    if expected_format is not None and meta.get("format") != expected_format:
        raise CheckpointError(f"{path}: expected format {expected_format!r}, got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: expected version {VERSION}, got {meta.get('version')!r}")
    return meta, arrays


def _validated(params, arrays, path):
    """Check that `arrays` holds exactly the keys and shapes of `params` {key: Parameter};
    return the arrays cast to each parameter's dtype. Nothing is assigned here."""
    missing = [k for k in params if k not in arrays]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} (expected shape "
                              f"{params[missing[0]].value.shape}); {len(missing)} key(s) missing")
    extra = [k for k in arrays if k not in params]
    if extra:
        raise CheckpointError(f"{path}: unexpected key {extra[0]!r} with shape {arrays[extra[0]].shape}; "
                              "the model has no such parameter")
    out = {}
    for k, p in params.items():
        a = arrays[k]
        if a.shape != p.value.shape:
            raise CheckpointError(f"{path}: key {k!r} has shape {a.shape} in the file, "
                                  f"but the model expects {p.value.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise CheckpointError(f"{path}: key {k!r} expected a float array, got dtype {a.dtype}")
        if not np.isfinite(a).all():  # NaN weights would turn every prediction into class 0
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            raise CheckpointError(f"{path}: key {k!r} holds {a[where]} at index {where}; "
                                  "expected finite weights")
        out[k] = a.astype(p.value.dtype, copy=False)
    return out


def _config(cls, fields, path, what):
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {what} is not valid ({e})") from e


# ----------------------------------------------------------------------------- the base


def save_base(model, path):
    """Write every base parameter (not the adapters) and the model config to `path`."""
    merged = [n for n, s in model.adapters.items() if s.merged]
    if merged:  # the base's weights hold that task's LoRA update now
        raise CheckpointError(f"model: task {merged[0]!r} is merged into the base weights; "
                              f"model.unmerge({merged[0]!r}) before saving the base")
    arrays = {n: p.value for n, p in model.named_parameters().items() if not n.startswith("adapters.")}
    _atomic_savez(path, arrays, {"format": BASE_FORMAT, "version": VERSION,
                                 "model_config": model.config.to_dict()})


def load_base(path, model=None):
    """A new Transformer built from the file's config, or (with `model`) the file's weights loaded
    into that model after checking that its config matches."""
    meta, arrays = _read(path, BASE_FORMAT)
    file_cfg = _config(ModelConfig, meta.get("model_config", {}), path, "model_config")
    if model is None:
        model = Transformer(file_cfg)
    else:
        mine = model.config.to_dict()
        for key, theirs in file_cfg.to_dict().items():
            if key not in ("dropout", "dtype") and mine[key] != theirs:
                raise CheckpointError(f"{path}: {key} is {theirs!r} in the file, but {mine[key]!r} in the model")
    params = {n: p for n, p in model.named_parameters().items() if not n.startswith("adapters.")}
    for name, value in _validated(params, arrays, path).items():
        params[name].value = value.copy()
    return model


# ----------------------------------------------------------------------------- one adapter


def save_adapter(model, name, path):
    """Write adapter `name`: its weights, its head, its LayerNorms when they train (or its LoRA
    matrices, prefix, prompt, bias copies), its method and config, and the base fields it
    depends on."""
    s = model.get_adapter(name)
    prefix = f"adapters.{name}."
    arrays = {p.name[len(prefix):]: p.value for p in s.parameters()}
    base = {k: model.config.to_dict()[k] for k in ADAPTER_BASE_FIELDS}
    _atomic_savez(path, arrays, {"format": ADAPTER_FORMAT, "version": VERSION, "name": name,
                                 "n_classes": s.n_classes, "method": s.method,
                                 "adapter_config": s.config.to_dict(), "base": base})


def load_adapter(model, path, name=None):
    """Add the adapter stored at `path` to `model` (under `name`, default the saved one) -> name.

    The base fields it was trained on must match the model's; every key and shape must match.
    The model is changed only after everything has been checked.
    """
    meta, arrays = _read(path, ADAPTER_FORMAT)
    name = meta.get("name") if name is None else name
    for key in ADAPTER_BASE_FIELDS:
        theirs, mine = meta.get("base", {}).get(key), getattr(model.config, key)
        if theirs != mine:
            raise CheckpointError(f"{path}: the adapter was trained on a base with {key}={theirs!r}, "
                                  f"but the model has {key}={mine!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise CheckpointError(f"name: expected an identifier like 'sentiment', got {name!r}")
    if name in model.adapters:
        raise CheckpointError(f"name: the model already has an adapter called {name!r}")
    method = meta.get("method", "adapter")  # files written before the other methods: adapters
    if method not in METHODS:
        raise CheckpointError(f"{path}: method expected one of {tuple(METHODS)}, got {method!r}")
    fields = meta.get("adapter_config", {})
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: adapter_config expected a JSON object, got {type(fields).__name__}")
    config = _config(METHODS[method], fields, path, "adapter_config")
    n_classes = meta.get("n_classes")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise CheckpointError(f"{path}: n_classes expected a positive integer, got {n_classes!r}")
    s = Task(name, config, n_classes, model, np.random.default_rng(0))  # not yet in the model
    prefix = f"adapters.{name}."
    params = {p.name[len(prefix):]: p for p in s.parameters()}
    for key, value in _validated(params, arrays, path).items():
        params[key].value = value.copy()
    model.adapters[name] = s  # the one and only change to the model
    return name
