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
  the shipped base and the repository's files are written only with overwrite=True;
- reading is bounded before anything is allocated: only a regular file is opened; each member's
  .npy header is read first (never a pickle: an object dtype is refused) and the bytes it claims
  must be the bytes the member holds; the configs in `__meta__` must imply no more parameters than
  the file holds, and every shape must be the model's, before any array is read;
- `__meta__` is checked field by field (type, range, the rules of add_adapter): a bad field of any
  type or depth is a CheckpointError naming it;
- values are checked finite after the cast to the model's dtype (1e39 in a float64 file would
  become inf in float32), before the first array is assigned, so a bad file leaves the model untouched.
"""
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from .. import sizes
from ..model import ModelConfig, Transformer
from ..tasks import METHODS, Task
from .files import atomic_write, kind, shipped

VERSION = 1
BASE_FORMAT = "minitransformer-base"
ADAPTER_FORMAT = "minitransformer-adapter"
# the base's config fields an adapter depends on: a mismatch in any of them is refused
ADAPTER_BASE_FIELDS = ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "norm", "pooling")


META_LIMIT = 1 << 20  # bytes of `__meta__`: a real one is under 2 KB
DEFLATE_RATIO = 1032  # the most a deflated member can grow when read (zlib's bound)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _refuse_shipped(path, overwrite):
    what = shipped(path)
    if what and not overwrite:
        raise CheckpointError(f"path: {path} is shipped work ({what}); pass overwrite=True to replace it")


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


class _Archive:
    """The members of an .npz, by name: {name: (shape, dtype)} read from the .npy headers only;
    read(name) -> the array, allocated only then (its size checked against the member's bytes)."""

    def __init__(self, path):
        self.path, self.headers = path, {}
        with zipfile.ZipFile(path) as z:
            self._headers(z, Path(path).stat().st_size)

    def _headers(self, z, size):
        path = self.path
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            if not info.filename.endswith(".npy") or name in self.headers:
                raise CheckpointError(f"{path}: member {info.filename!r} is not one .npy array")
            bound = size if info.compress_type == zipfile.ZIP_STORED else size * DEFLATE_RATIO
            if info.file_size > bound:
                raise CheckpointError(f"{path}: member {info.filename!r} claims {info.file_size:,} bytes, "
                                      f"more than a {size:,}-byte file can hold")
            with z.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                except (ValueError, EOFError, OSError, SyntaxError, TypeError) as e:
                    raise CheckpointError(f"{path}: member {info.filename!r} has no valid .npy header "
                                          f"({e})") from e
                header = f.tell()
            if dtype.hasobject:
                raise CheckpointError(f"{path}: holds a pickled object; refusing to unpickle it ({name!r}) "
                                      "(checkpoints contain plain numeric arrays only)")
            nbytes = math.prod(shape) * dtype.itemsize
            if header + nbytes != info.file_size:
                raise CheckpointError(f"{path}: member {name!r} claims shape {shape} ({nbytes:,} bytes) but "
                                      f"holds {info.file_size - header:,} bytes; truncated or corrupt")
            self.headers[name] = (shape, dtype)

    def read(self, name):
        with zipfile.ZipFile(self.path) as z, z.open(f"{name}.npy") as f:
            a = np.lib.format.read_array(f, allow_pickle=False)
        if (a.shape, a.dtype) != self.headers[name]:  # the file changed since its headers were read
            raise CheckpointError(f"{self.path}: member {name!r} changed while it was read")
        return a

    def elements(self):
        """How many numbers the arrays hold (`__meta__` aside): the most a file can load."""
        return sum(math.prod(shape) for key, (shape, _) in self.headers.items() if key != "__meta__")


def _read(path, expected_format):
    """-> (meta dict, _Archive). Raises CheckpointError for anything unreadable, or of another
    format than `expected_format` (None: any). No array but `__meta__` is read here."""
    path = Path(path)
    what = kind(path)
    if what != "file":
        got = "" if what is None else f" ({'a folder' if what == 'folder' else what})"
        raise CheckpointError(f"path: expected an existing checkpoint file, got {str(path)!r}{got}")
    if not zipfile.is_zipfile(path):  # else np.load would take a .npy for one array, other bytes for a pickle
        raise CheckpointError(f"{path}: not a readable .npz checkpoint, truncated or corrupt "
                              "(no zip archive found)")
    try:
        archive = _Archive(path)
        if "__meta__" not in archive.headers:
            raise CheckpointError(f"{path}: expected a '__meta__' entry, got keys "
                                  f"{sorted(archive.headers)[:5]}...")
        shape, dtype = archive.headers["__meta__"]
        if shape != () or dtype.kind not in "US" or dtype.itemsize > META_LIMIT:
            raise CheckpointError(f"{path}: '__meta__' expected one string of at most {META_LIMIT:,} bytes, "
                                  f"got shape {shape}, dtype {dtype}")
        text = str(archive.read("__meta__"))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint, truncated or corrupt ({e})") from e
    try:
        meta = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # bad JSON, NaN, nested deeper than Python recurses
        raise CheckpointError(f"{path}: '__meta__' is not valid JSON ({str(e)[:100] or type(e).__name__})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: '__meta__' expected a JSON object, got {type(meta).__name__}")
    if expected_format is not None and meta.get("format") != expected_format:
        raise CheckpointError(f"{path}: expected format {expected_format!r}, got {_short(meta.get('format'))}")
    if not isinstance(meta.get("version"), int) or isinstance(meta.get("version"), bool) \
            or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: expected version {VERSION}, got {_short(meta.get('version'))}")
    return meta, archive


def _no_constant(name):
    raise ValueError(f"{name} is not a value a checkpoint's metadata holds")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(meta, key, path, expected, test):
    """meta[key] after test(value); CheckpointError naming the field otherwise."""
    value = meta.get(key)
    if not test(value):
        raise CheckpointError(f"{path}: {key} expected {expected}, got {_short(value)}")
    return value


def _fits_in_file(count, archive, path, what):
    """Refuse a config that implies more parameters than the file holds: it would allocate them
    before the keys could be compared (a 1 MB file claiming vocab_size=10**7)."""
    held = archive.elements()
    if count > 2 * held + 4096:  # a margin for a method's parameters not saved (none today)
        raise CheckpointError(f"{path}: {what} implies {count:,} parameters, but the file holds "
                              f"{held:,} numbers; refusing to build it")


def _validated(params, archive, path):
    """Check that the archive holds exactly the keys and shapes of `params` {key: Parameter}
    (from the headers: nothing read yet), then read each array, cast it to its parameter's dtype
    and check it finite. Nothing is assigned here."""
    headers = {k: v for k, v in archive.headers.items() if k != "__meta__"}
    missing = [k for k in params if k not in headers]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} (expected shape "
                              f"{params[missing[0]].value.shape}); {len(missing)} key(s) missing")
    extra = [k for k in headers if k not in params]
    if extra:
        raise CheckpointError(f"{path}: unexpected key {extra[0]!r} with shape {headers[extra[0]][0]}; "
                              "the model has no such parameter")
    for k, p in params.items():
        shape, dtype = headers[k]
        if shape != p.value.shape:
            raise CheckpointError(f"{path}: key {k!r} has shape {shape} in the file, "
                                  f"but the model expects {p.value.shape}")
        if not np.issubdtype(dtype, np.floating):
            raise CheckpointError(f"{path}: key {k!r} expected a float array, got dtype {dtype}")
    out = {}
    for k, p in params.items():
        try:
            a = archive.read(k)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: key {k!r} cannot be read, truncated or corrupt ({e})") from e
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: caught below
            cast = a.astype(p.value.dtype, copy=False)
        if not np.isfinite(cast).all():  # NaN weights would turn every prediction into class 0
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(cast))[0])
            held = f"{a[where]}" if a[where] == cast[where] or not np.isfinite(a[where]) else \
                f"{a[where]:g}, {cast[where]} as {p.value.dtype}"
            raise CheckpointError(f"{path}: key {k!r} holds {held} at index {where}; expected finite weights")
        a = cast
        out[k] = a
    return out


def _config(cls, fields, path, what):
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: {what} expected a JSON object, got {type(fields).__name__} "
                              f"{_short(fields)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"{path}: {what} is not valid ({str(e)[:200]})") from e


# ----------------------------------------------------------------------------- the base


def save_base(model, path, overwrite=False):
    """Write every base parameter (not the adapters) and the model config to `path` (shipped
    work, such as the package's assets/base.npz, only with overwrite=True)."""
    _refuse_shipped(path, overwrite)
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
    meta, archive = _read(path, BASE_FORMAT)
    file_cfg = _config(ModelConfig, meta.get("model_config"), path, "model_config")
    if model is None:
        _fits_in_file(sizes.parameter_count(file_cfg), archive, path, "model_config")
        model = Transformer(file_cfg)
    else:
        mine = model.config.to_dict()
        for key, theirs in file_cfg.to_dict().items():
            if key not in ("dropout", "dtype") and mine[key] != theirs:
                raise CheckpointError(f"{path}: {key} is {theirs!r} in the file, but {mine[key]!r} in the model")
    params = {n: p for n, p in model.named_parameters().items() if not n.startswith("adapters.")}
    for name, value in _validated(params, archive, path).items():
        params[name].value = value.copy()
    return model


# ----------------------------------------------------------------------------- one adapter


def save_adapter(model, name, path, overwrite=False):
    """Write adapter `name`: its weights, its head, its LayerNorms when they train (or its LoRA
    matrices, prefix, prompt, bias copies), its method and config, and the base fields it
    depends on (into shipped work only with overwrite=True)."""
    _refuse_shipped(path, overwrite)
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
    meta, archive = _read(path, ADAPTER_FORMAT)
    base = _field(meta, "base", path, "a JSON object of the base's fields", lambda v: isinstance(v, dict))
    for key in ADAPTER_BASE_FIELDS:
        theirs, mine = base.get(key), getattr(model.config, key)
        if type(theirs) is not type(mine) or theirs != mine:  # 64.0 or True is not the model's 64 or 1
            raise CheckpointError(f"{path}: the adapter was trained on a base with {key}={_short(theirs)}, "
                                  f"but the model has {key}={mine!r}")
    name = _field(meta, "name", path, "an identifier like 'sentiment'",
                  lambda v: isinstance(v, str) and v.isidentifier()) if name is None else name
    if not isinstance(name, str) or not name.isidentifier():
        raise CheckpointError(f"name: expected an identifier like 'sentiment', got {name!r}")
    if name in model.adapters:
        raise CheckpointError(f"name: the model already has an adapter called {name!r}")
    meta.setdefault("method", "adapter")  # files written before the other methods: adapters
    method = _field(meta, "method", path, f"one of {tuple(METHODS)}",
                    lambda v: isinstance(v, str) and v in METHODS)
    config = _config(METHODS[method], meta.get("adapter_config", {}), path, "adapter_config")
    n_classes = _field(meta, "n_classes", path, "an integer >= 2 (as add_adapter requires)",
                       lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2)
    _fits_in_file(sizes.adapter_parameter_count(model.config, config, n_classes), archive, path,
                  "adapter_config with n_classes")
    s = Task(name, config, n_classes, model, np.random.default_rng(0))  # not yet in the model
    prefix = f"adapters.{name}."
    params = {p.name[len(prefix):]: p for p in s.parameters()}
    for key, value in _validated(params, archive, path).items():
        params[key].value = value.copy()
    model.adapters[name] = s  # the one and only change to the model
    return name
