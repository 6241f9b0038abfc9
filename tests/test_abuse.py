"""The bad-input catalogue (docs/errors.md): everything wrong that a user might type or pass.

Each case runs as the user would, a subprocess of `python -m minitransformer ...` from the
repository root (or one call of the Python API), and must give the right exit code (2: a bad
argument, 1: a failure during the work), one line `minitransformer <command>: error: ...` naming
the problem, no traceback, and leave every file that existed before byte for byte as it was:
the shipped base, figures/, README.md and the files the case aims at. Refusals come before any
work, so the module stays fast; the two cases that run use one step or --quick sizes.
"""
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.tools import cli, data, files, pretrain, train
from minitransformer.tools.checkpoint import CheckpointError, load_adapter, load_base, save_adapter, save_base

ROOT = files.ROOT
HUGE = 10 ** 9  # a size no machine has memory for


def tiny_model():
    return Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder of files a user might point an argument at (all must survive every case)."""
    w = tmp_path_factory.mktemp("work")
    (w / "notes.txt").write_text("my notes\n")
    (w / "nomarkers.md").write_text("# a README without the results markers\n")
    (w / "other.json").write_text('{"a": 1}\n')
    model = tiny_model()
    save_base(model, w / "tiny_base.npz")
    model.add_adapter("task", AdapterConfig(bottleneck=2))
    save_adapter(model, "task", w / "adapter.npz")
    model.named_parameters()["blocks.0.attn.W_q"].value[1, 2] = np.nan
    save_base(model, w / "nan_base.npz")
    (w / "figs").mkdir()
    (w / "figs" / "results.json").write_text("not the results of a run\n")
    os.mkfifo(w / "fifo")  # would block a reader or a writer forever
    (w / "pipes").mkdir()
    os.mkfifo(w / "pipes" / "results.json")
    os.mkfifo(w / "pipes" / "tradeoff.png")
    os.symlink("loop", w / "loop")  # points at itself
    os.symlink(w / "nowhere", w / "dangling")
    results = json.loads((files.FIGURES / "results.json").read_text())
    task = next(iter(results["runs"]))
    for name, change in {"high": lambda r: r["runs"][task]["head"].update(test_acc="high"),
                         "nan": lambda r: r["runs"][task]["head"].update(test_acc=float("nan")),
                         "no_runs": lambda r: r.update(runs={}),
                         "runs_str": lambda r: r.update(runs="all of them"),
                         "no_method": lambda r: r["runs"][task]["head"].pop("method")}.items():
        r = json.loads(json.dumps(results))
        change(r)
        (w / f"{name}.json").write_text(json.dumps(r))  # json writes NaN for nan, as Python's json allows
    (w / "mywork").mkdir()  # a student's own notebook, edited
    (w / "mywork" / "01_gradients_by_hand.ipynb").write_text('{"cells": [], "note": "my answers"}\n')
    return w


def fingerprint(*folders_or_files):
    """{path: sha256} of every file under the given folders and files."""
    out = {}
    for top in folders_or_files:
        for path in ([top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def watched(work):
    return fingerprint(files.ASSETS, files.FIGURES, files.README, files.NOTEBOOKS, files.DOCS, work)


@pytest.fixture(autouse=True)
def nothing_changes(work):
    """Every file that existed before a case is byte for byte the same after it, none added."""
    before = watched(work)
    yield
    assert watched(work) == before


def run(*args, tmp, **env):
    """`python -m minitransformer *args` from the repository root, temporary folder `tmp`."""
    env = {**{k: v for k, v in os.environ.items() if k != "MINITRANSFORMER_DEBUG"}, "TMPDIR": str(tmp), **env}
    return subprocess.run([sys.executable, "-m", "minitransformer", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(result, command, code, fragment):
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"minitransformer {command}: error: " if command else "minitransformer: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert fragment in lines[0], lines[0]
    assert result.returncode == code, (result.returncode, lines[0])
    assert result.stdout == ""  # refused before any work: nothing printed, nothing written


# ----------------------------------------------------------------------------- the command line

REFUSED = [  # (command line, with {w} the work folder; exit code; the line must contain)
    ("nope", 2, "command: expected one of demo, gradcheck, pretrain, figures, bench, course, got 'nope'"),
    ("demo --steps abc", 2, "argument --steps: invalid int value: 'abc'"),
    ("demo --task nope", 2, "argument --task: invalid choice: 'nope'"),
    ("demo --bottleneck 0", 2, "--bottleneck: expected a positive integer, got 0"),
    ("demo --seed -1", 2, "--seed: expected a non-negative integer, got -1"),
    ("demo --bottleneck 1000000000", 2, "--bottleneck: training an adapter with m=1000000000"),
    ("demo --bottleneck 1000000", 2, "of memory, more than the"),
    ("demo --out minitransformer/assets/base.npz", 2, "--out: minitransformer/assets/base.npz is the file --base reads"),
    ("demo --out README.md", 2, "--out: README.md is shipped work (the repository's README.md), written only with --overwrite"),
    ("demo --out README.md --overwrite", 2, "--out: README.md exists and is not an adapter checkpoint"),
    ("demo --out figures/agreement.npz", 2, "is shipped work (the repository's figures/)"),
    ("demo --out {w}/notes.txt", 2, "notes.txt exists and is not an adapter checkpoint"),
    ("demo --out {w}/tiny_base.npz", 2, "tiny_base.npz exists and is not an adapter checkpoint"),
    ("demo --out {w}", 2, "is a folder, expected a file path"),
    ("demo --out {w}/notes.txt/a.npz", 2, "notes.txt is a file, expected a folder to write into"),
    ("demo --out /proc/minitransformer/a.npz", 2, "--out: cannot write in /proc"),
    ("demo --base README.md", 2, "--base: README.md: not a readable .npz checkpoint"),
    ("demo --base {w}/missing.npz", 2, "--base: expected an existing checkpoint file"),
    ("demo --base {w}/adapter.npz", 2, "expected format 'minitransformer-base', got 'minitransformer-adapter'"),
    ("demo --base {w}/nan_base.npz", 2, "key 'blocks.0.attn.W_q' holds nan at index (1, 2); expected finite weights"),
    ("demo --base {w}/tiny_base.npz", 2, "--base: expected a base for data.py's texts (vocab_size >= 99"),
    ("pretrain --steps 0", 2, "--steps: expected a positive integer, got 0"),
    ("pretrain --out minitransformer/assets/base.npz", 2, "is shipped work (the package folder), written only with --overwrite"),
    ("pretrain --out README.md --overwrite", 2, "README.md exists and is not a base checkpoint"),
    ("pretrain --out {w}/adapter.npz", 2, "adapter.npz exists and is not a base checkpoint"),
    ("figures --out figures", 2, "--out: figures is shipped work (the repository's figures/)"),
    ("figures --quick --out figures", 2, "written only with --overwrite"),
    ("figures --out {w}/notes.txt", 2, "notes.txt is a file, expected a folder"),
    ("figures --out {w}/figs", 2, "results.json exists and is not a results.json of this command"),
    ("figures --from-json README.md", 2, "--from-json: README.md is not valid JSON"),
    ("figures --from-json {w}/other.json", 2, "other.json lacks settings, base, tasks, runs"),
    ("figures --from-json {w}/missing.json", 2, "missing.json does not exist; expected an existing file"),
    ("figures --base README.md --out {w}/new", 2, "--base: README.md: not a readable .npz checkpoint"),
    ("figures --quick --out {w}/new --readme README.md", 2, "--readme: README.md is shipped work"),
    ("figures --quick --out {w}/new --readme {w}/nomarkers.md", 2, "is not a README with the results markers"),
    ("bench --cpu", 2, "--cpu: only used with --profile"),
    ("bench --profile --json {w}/b.json", 2, "--json: the profile writes no JSON"),
    ("bench --threads 0", 2, "argument --threads: expected an integer from 1 to 256, got 0"),
    ("bench --json README.md", 2, "--json: README.md is shipped work (the repository's README.md), written only with --overwrite"),
    ("bench --json {w}", 2, "is a folder"),
    ("bench --json {w}/notes.txt", 2, "notes.txt exists and is not a JSON file written by bench"),
    ("gradcheck --fast", 2, "unrecognized arguments: --fast"),
    # FIFOs, devices, symlink loops, dangling links: one line before any work, never a hang
    ("bench --quick --json {w}/fifo", 2, "--json: {w}/fifo is a FIFO (named pipe); expected a regular file"),
    ("bench --quick --json /dev/full", 2, "--json: /dev/full is a device; expected a regular file"),
    ("demo --readme {w}/fifo", 2, "--readme: {w}/fifo is a FIFO"),
    ("demo --base {w}/fifo", 2, "--base: expected an existing checkpoint file, got '{w}/fifo' (a FIFO"),
    ("figures --quick --out {w}/pipes", 2, "--out: {w}/pipes/tradeoff.png is a FIFO"),
    ("figures --from-json {w}/high.json", 2, ".test_acc: expected a finite number from 0 to 1, got 'high'"),
    ("figures --from-json {w}/nan.json", 2, "is not valid JSON (NaN is not a number a results.json holds"),
    ("figures --from-json {w}/no_runs.json", 2, "no_runs.json.runs: expected at least one entry, got none"),
    ("figures --from-json {w}/runs_str.json", 2, "runs_str.json.runs: expected a JSON object, got str 'all of them'"),
    ("figures --from-json {w}/no_method.json", 2, ".head: expected the key 'method'"),
    ("demo --out {w}/dangling/a.npz", 2, "--out: {w}/dangling is a dangling symlink, expected a folder to write into"),
    ("course run --overwrite README.md", 2, "NOTEBOOK: README.md is not a valid notebook"),
    ("figures --from-json {w}/fifo", 2, "--from-json: {w}/fifo is a FIFO (named pipe); expected a regular file"),
    ("figures --from-json /dev/zero", 2, "--from-json: /dev/zero is a device"),
    ("demo --out {w}/loop", 2, "--out: {w}/loop is a symlink loop"),
    ("figures --quick --out {w}/loop", 2, "--out: {w}/loop is a symlink loop, expected a folder"),
    ("figures --quick --out {w}/dangling", 2, "--out: {w}/dangling is a dangling symlink, expected a folder"),
    ("course run --overwrite {w}/fifo", 2, "NOTEBOOK: {w}/fifo is a FIFO"),
    # empty strings, folder paths, names too long
    ("demo --out ", 2, "--out: expected a path, got an empty string"),
    ("bench --quick --json ", 2, "--json: expected a path, got an empty string"),
    ("figures --from-json ", 2, "--from-json: expected a path, got an empty string"),
    ("figures --quick --out ", 2, "--out: expected a path, got an empty string"),
    ("demo --out {w}/new/", 2, "names a folder (it ends with '/'), expected a file path"),
    ("demo --out {w}/" + "a" * 300 + ".npz", 2, "is 304 bytes long; expected at most"),
    ("figures --quick --out {w}/" + "a" * 300, 2, "is 300 bytes long; expected at most 255"),
    # numbers out of range
    ("course run --overwrite --timeout -1", 2, "argument --timeout: expected an integer from 1 to 86400, got -1"),
    ("course run --overwrite --timeout 0", 2, "argument --timeout: expected an integer from 1 to 86400, got 0"),
    ("course run --overwrite --timeout 1.5", 2, "argument --timeout: expected an integer from 1 to 86400, got '1.5'"),
    ("bench --threads 100000", 2, "argument --threads: expected an integer from 1 to 256, got 100000"),
    # the course's commands under the same rules as the others
    ("course student README.md", 2, "OUT_DIR: README.md is a file, expected a folder"),
    ("course student figures", 2, "OUT_DIR: figures is shipped work (the repository's figures/)"),
    ("course student minitransformer/assets", 2, "is shipped work (the package folder)"),
    ("course student {w}/mywork", 2, "holds 01_gradients_by_hand.ipynb, which is not the copy this command"),
    ("course run --no-execute notebooks/01_gradients_by_hand.ipynb", 2, "expected --overwrite to allow it"),
    ("bench --quick --docs docs/performance.md", 2, "--docs: docs/performance.md is shipped work (the repository's docs/)"),
]


def argv(line, work):
    """The words of a REFUSED line; a line ending in a space ends in an empty argument ('')."""
    words = line.format(w=work).split()
    return words + [""] if line.endswith(" ") else words


@pytest.fixture(scope="module")
def refusals(work, tmp_path_factory):
    """{line: result} of every REFUSED line, run two at a time (each is a process of its own),
    and the watched files before them."""
    tmp = tmp_path_factory.mktemp("tmp")
    before = watched(work)
    lines = [line for line, _, _ in REFUSED]
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(lines, pool.map(lambda line: run(*argv(line, work), tmp=tmp), lines)))
    assert not (tmp / "minitransformer-out").exists()  # none wrote to the scratch folder either
    return results, before


@pytest.mark.parametrize("line, code, fragment", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_before_any_work(line, code, fragment, work, refusals):
    results, before = refusals
    command = "" if line == "nope" else line.split()[0]
    assert_one_line(results[line], command, code, fragment.format(w=work))
    assert watched(work) == before


@pytest.mark.parametrize("how", [("--debug",), ()], ids=["--debug", "MINITRANSFORMER_DEBUG=1"])
def test_debug_shows_the_traceback(how, tmp_path):
    result = run("demo", "--base", "README.md", *how, tmp=tmp_path,
                 **({} if how else {"MINITRANSFORMER_DEBUG": "1"}))
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("minitransformer demo: error: --base: README.md")


def test_pretrain_writes_to_scratch_not_the_shipped_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "CORPUS", 300)  # the command's corpus size, kept small here
    monkeypatch.setattr(files, "SCRATCH", tmp_path / "minitransformer-out")
    assert cli.run("pretrain", pretrain.main, ["--steps", "1", "--quiet"]) == 0
    out = tmp_path / "minitransformer-out" / "base.npz"
    assert load_base(out).config == pretrain.BASE_CONFIG
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "the shipped base is unchanged" in printed


def test_quick_figures_go_to_scratch_not_the_repository(tmp_path):
    result = run("figures", "--quick", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "minitransformer-out" / "figures"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json"] + [f"{name}.png" for name in ("tradeoff", "ablation", "init_std", "curves", "storage")])
    assert f"to {out}" in result.stdout and "the repository's figures are unchanged" in result.stdout


# ----------------------------------------------------------------------------- the Python API

def refused(error, message, call, *args, **kwargs):
    with pytest.raises(error, match=message):
        call(*args, **kwargs)


@pytest.mark.parametrize("n_classes", [0, -1, 2.5, True])
def test_add_adapter_refuses_bad_n_classes(n_classes):
    refused(ValueError, rf"n_classes: expected an integer >= 2, got {n_classes!r}",
            tiny_model().add_adapter, "task", AdapterConfig(bottleneck=2), n_classes)


def test_add_adapter_refuses_what_is_not_an_adapter_config():
    refused(TypeError, r"config: expected one of AdapterConfig, LoRAConfig, PrefixConfig, PromptConfig, "
                       r"BitFitConfig, got dict", tiny_model().add_adapter, "task", {"bottleneck": 2})


def test_add_adapter_refuses_a_bottleneck_that_would_not_fit():
    refused(ValueError, r"config: the adapter task \(.* parameters\) needs about .* of memory",
            tiny_model().add_adapter, "task", AdapterConfig(bottleneck=HUGE))


@pytest.mark.parametrize("field, value, expected", [
    ("ln_eps", 0.0, "a number > 0"), ("ln_eps", -1.0, "a number > 0"), ("ln_eps", float("nan"), "a number > 0"),
    ("init_std", float("nan"), "a number >= 0"), ("init_std", -0.02, "a number >= 0"),
    ("dropout", float("nan"), "0 <= p < 1"), ("causal", 1, "True or False"),
    ("vocab_size", 0, "a positive integer"), ("max_len", 2.0, "a positive integer"),
])
def test_model_config_names_the_bad_field(field, value, expected):
    refused(ValueError, rf"{field}: expected {expected}, got {value!r}", ModelConfig, **{field: value})


def test_a_huge_model_config_is_refused_with_the_estimate():
    refused(ValueError, r"ModelConfig: [\d,]+ parameters \(vocab_size=128, d_model=1000000000, d_ff=1, "
                        r"n_layers=2\) needs about [\d.]+ PB of memory, more than the [\d.]+ [kMGT]B available",
            ModelConfig, d_model=HUGE, n_heads=1, d_ff=1)


@pytest.mark.parametrize("field, value, expected", [
    ("scaling", float("nan"), "a number > 0"), ("scaling", -1.0, "a number > 0"), ("scaling", 0, "a number > 0"),
    ("init_std", float("inf"), "a number >= 0"), ("reduction_factor", float("nan"), "a number > 0"),
    ("train_layernorm", "yes", "True or False"),
])
def test_adapter_config_names_the_bad_field(field, value, expected):
    refused(ValueError, rf"{field}: expected {expected}, got {value!r}", AdapterConfig, **{field: value})


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("weight_decay", -1.0), ("progress", 1),
                                          ("seed", -1), ("steps", True)])
def test_train_config_names_the_bad_field(field, value):
    refused(ValueError, rf"{field}: expected .*, got {value!r}", train.TrainConfig, **{field: value})


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_an_empty_batch_is_refused_at_the_input(shape):
    refused(ValueError, r"ids: expected at least one sequence of at least one token, got shape",
            tiny_model().forward, np.zeros(shape, np.int64))


def test_a_batch_too_large_for_memory_is_refused_before_any_work():
    ids = np.broadcast_to(np.zeros(1, np.int64), (HUGE, 8))  # a view: no memory of its own
    refused(ValueError, r"ids: a batch of shape \(1000000000, 8\) .* needs about", tiny_model().forward, ids)


def test_an_adapter_file_with_inf_weights_is_refused_naming_the_array(tmp_path):
    model = tiny_model()
    model.add_adapter("task", AdapterConfig(bottleneck=2))
    model.named_parameters()["adapters.task.head.b"].value[0] = np.inf
    save_adapter(model, "task", tmp_path / "inf.npz")
    target = tiny_model()
    refused(CheckpointError, r"key 'head.b' holds inf at index \(0,\)", load_adapter, target, tmp_path / "inf.npz")
    assert not target.adapters  # the model is untouched


@pytest.fixture
def quiet_overflow():
    with np.errstate(all="ignore"):  # the point of these cases is the overflow: no warnings about it
        yield


def test_fit_stops_on_a_nan_loss_and_keeps_its_weights(quiet_overflow):
    task = data.load_task("agreement")
    model = Transformer(ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=16,
                                    n_heads=2, n_layers=1, d_ff=32))
    train.prepare(model, "adapter", task.n_classes, adapter_config=AdapterConfig(bottleneck=4))
    start = {p.name: p.value.copy() for p in model.parameters(trainable_only=True)}
    refused(train.DivergedError, r"training stopped at step \d+: .*became nan.*keeps the weights it started from",
            train.fit, model, task, train.TrainConfig(steps=20, lr=1e30, eval_every=5, progress=False))
    assert all(np.array_equal(p.value, start[p.name]) for p in model.parameters(trainable_only=True))


def test_pretrain_stops_on_a_nan_loss_and_writes_nothing(work, monkeypatch, capsys, quiet_overflow):
    monkeypatch.setattr(pretrain, "CORPUS", 300)
    monkeypatch.setattr(pretrain, "LR", 1e30)  # diverges at once
    out = work / "tiny_base.npz"  # an existing base: the command may replace it, but must not here
    assert cli.run("pretrain", pretrain.main, ["--steps", "20", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("minitransformer pretrain: error: pretraining stopped at step")
    assert "nothing was written" in err[0]


def test_a_save_that_dies_half_way_leaves_the_old_file_and_no_temporary(work):
    target = work / "notes.txt"

    def dies(f):
        f.write(b"half of it")
        raise OSError("disk full")
    refused(OSError, "disk full", files.atomic_write, target, dies)
    assert sorted(p.name for p in work.iterdir() if p.name.endswith(files.TMP_SUFFIX)) == []


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "saves"
    folder.mkdir()
    old = folder / f".a.npz.k1ll3d{files.TMP_SUFFIX}"
    young = folder / f".a.npz.running{files.TMP_SUFFIX}"
    for p in (old, young):
        p.write_bytes(b"PK half")
    stale = time.time() - files.STALE_SECONDS - 60
    os.utime(old, (stale, stale))
    model = tiny_model()
    model.add_adapter("task", AdapterConfig(bottleneck=2))
    save_adapter(model, "task", folder / "a.npz")
    assert not old.exists() and young.exists()  # a younger one may be a save still running
    load_adapter(tiny_model(), folder / "a.npz")


def test_the_demo_tells_the_shipped_base_from_another():
    from minitransformer.tools import demo
    model = pretrain.load_pretrained()
    assert demo.which_base(demo.base_checksums(model)).startswith("the shipped base (sha256 6aa2a314e48b...)")
    model.named_parameters()["embed.W_tok"].value[0, 0] += 1
    assert demo.which_base(demo.base_checksums(model)).startswith("NOT the shipped base")


def test_bench_quick_shows_the_targets_as_not_applicable():
    from minitransformer.tools import bench, bench_report
    res = {"config": vars(bench.QUICK), "adapter_over_full_step": 0.9, "gemm_efficiency": 0.1,
           "adapter_latency_overhead": 0.5}  # every ratio misses its target
    assert bench_report.verdict(res, "adapter_over_full_step").startswith("not applicable at these sizes")
    res["config"] = vars(bench.BenchConfig())
    assert bench_report.verdict(res, "adapter_over_full_step") == "NOT met"
