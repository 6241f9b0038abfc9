"""The bad-input catalogue, continued (docs/errors.md): hostile checkpoint files, a full disk,
interruptions and signals at any moment, concurrent runs, and the API's guards.

Each command-line case runs as a subprocess, as a user would type it, and is bounded by a timeout
so that a regression fails instead of hanging. Full disks are a file-size limit (`ulimit -f`)
in the subprocess; signals are sent after the subprocess prints a marker.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from minitransformer import AdapterConfig, LoRAConfig, ModelConfig, Transformer
from minitransformer.tools import files, train
from minitransformer.tools.checkpoint import CheckpointError, load_adapter, load_base, save_adapter, save_base

ROOT = files.ROOT
TIMEOUT = 120  # seconds: no case takes more than a few; a hang fails here


def tiny_model():
    return Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16))


def env(tmp, **extra):
    keep = {k: v for k, v in os.environ.items() if k != "MINITRANSFORMER_DEBUG"}
    return {**keep, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **extra}


def run(*args, tmp, shell_prefix=None, **extra):
    """`python -m minitransformer *args` from the repository root (after `shell_prefix`, e.g. a ulimit)."""
    argv = [sys.executable, "-m", "minitransformer", *args]
    if shell_prefix:
        argv = ["bash", "-c", f"{shell_prefix}; exec \"$@\"", "bash", *argv]
    return subprocess.run(argv, cwd=ROOT, env=env(tmp, **extra), capture_output=True, text=True, timeout=TIMEOUT)


def one_line(result, code, fragment):
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minitransformer"), lines[0]
    assert fragment in lines[0], lines[0]
    assert result.returncode == code, (result.returncode, lines[0])


def no_temporaries(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(files.TMP_SUFFIX)]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- hostile checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    save_base(model, d / "base.npz")
    model.add_adapter("task", LoRAConfig(r=2))
    save_adapter(model, "task", d / "lora.npz")
    return d


def members(path):
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def write_members(path, entries):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def npy(array):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def with_meta(src, dst, change=None, text=None):
    """A copy of checkpoint `src` whose __meta__ is changed (dict update) or replaced (text)."""
    entries = members(src)
    meta = json.loads(str(np.load(src)["__meta__"]))
    meta.update(change or {})
    entries["__meta__.npy"] = npy(np.array(text if text is not None else json.dumps(meta)))
    return write_members(dst, entries)


def test_a_base_whose_config_claims_a_huge_vocabulary_is_refused_at_once(ckpt, tmp_path):
    meta = json.loads(str(np.load(ckpt / "base.npz")["__meta__"]))
    bad = with_meta(ckpt / "base.npz", tmp_path / "b.npz",
                    {"model_config": {**meta["model_config"], "vocab_size": 10 ** 7}})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model_config implies [\d,]+ parameters, but the file holds"):
        load_base(bad)
    assert time.perf_counter() - start < 2  # refused from the numbers, nothing allocated


def test_an_adapter_recording_a_huge_lora_rank_is_refused_before_allocating(ckpt, tmp_path):
    meta = json.loads(str(np.load(ckpt / "lora.npz")["__meta__"]))
    bad = with_meta(ckpt / "lora.npz", tmp_path / "a.npz",
                    {"adapter_config": {**meta["adapter_config"], "r": 10 ** 9}})
    model = load_base(ckpt / "base.npz")
    with pytest.raises(CheckpointError, match=r"adapter_config with n_classes implies [\d,]+ parameters"):
        load_adapter(model, bad)
    assert not model.adapters


def test_an_npy_header_claiming_more_bytes_than_the_member_holds_is_refused(ckpt, tmp_path):
    entries = members(ckpt / "base.npz")
    data = entries["embed.W_tok.npy"]
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    entries["embed.W_tok.npy"] = buf.getvalue() + data[128:]  # the same bytes under a 4 TB header
    bad = write_members(tmp_path / "b.npz", entries)
    with pytest.raises(CheckpointError, match=r"member 'embed.W_tok' claims shape \(1000000, 1000000\)"):
        load_base(bad)


@pytest.mark.parametrize("case, message", [
    ("deep", r"'__meta__' is not valid JSON"),
    ("no header", r"member 'embed.W_tok.npy' has no valid .npy header"),
    ("method list", r"method expected one of \('adapter', .*\), got \['lora'\]"),
    ("base list", r"base expected a JSON object of the base's fields, got \[1, 2\]"),
    ("n_classes 1", r"n_classes expected an integer >= 2 \(as add_adapter requires\), got 1"),
    ("n_classes bool", r"n_classes expected an integer >= 2 .*got True"),
    ("config str", r"adapter_config expected a JSON object, got str"),
    ("version bool", r"expected version 1, got True"),
    ("NaN in meta", r"'__meta__' is not valid JSON \(NaN is not a value"),
])
def test_malformed_metadata_of_any_type_or_depth_is_a_checkpoint_error(ckpt, tmp_path, case, message):
    src = ckpt / "lora.npz"
    dst = tmp_path / "bad.npz"
    if case == "deep":
        with_meta(src, dst, text="[" * 100_000 + "]" * 100_000)
    elif case == "no header":
        src = ckpt / "base.npz"
        entries = members(src)
        entries["embed.W_tok.npy"] = b"\0" * 64
        write_members(dst, entries)
    elif case == "NaN in meta":
        with_meta(src, dst, text='{"format": "minitransformer-adapter", "version": 1, "n_classes": NaN}')
    else:
        change = {"method list": {"method": ["lora"]}, "base list": {"base": [1, 2]},
                  "n_classes 1": {"n_classes": 1}, "n_classes bool": {"n_classes": True},
                  "config str": {"adapter_config": "r=2"}, "version bool": {"version": True}}[case]
        with_meta(src, dst, change)
    model = load_base(ckpt / "base.npz")
    with pytest.raises(CheckpointError, match=message):
        (load_base if src.name == "base.npz" else lambda p: load_adapter(model, p))(dst)
    assert not model.adapters


def test_float64_weights_beyond_float32_are_refused_after_the_cast(ckpt, tmp_path):
    entries = members(ckpt / "base.npz")
    w = np.load(ckpt / "base.npz")["embed.W_tok"].astype(np.float64)
    w[3, 1] = 1e39  # finite in float64, inf in float32
    entries["embed.W_tok.npy"] = npy(w)
    bad = write_members(tmp_path / "b.npz", entries)
    with pytest.raises(CheckpointError, match=r"key 'embed.W_tok' holds 1e\+39, inf as float32 at index \(3, 1\)"):
        load_base(bad)


def test_a_checkpoint_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "base.npz")
    with pytest.raises(CheckpointError, match=r"expected an existing checkpoint file, got .* \(a FIFO"):
        load_base(tmp_path / "base.npz")


# ----------------------------------------------------------------------------- the API's guards


@pytest.mark.parametrize("target", [files.ASSETS / "base.npz", files.README, files.FIGURES / "x.npz",
                                    files.NOTEBOOKS / "x.npz"], ids=lambda p: p.name)
def test_save_refuses_shipped_work_unless_asked(target):
    before = target.read_bytes() if target.exists() else None
    model = tiny_model()
    model.add_adapter("task", AdapterConfig(bottleneck=2))
    with pytest.raises(CheckpointError, match=r"is shipped work .*; pass overwrite=True"):
        save_base(model, target)
    with pytest.raises(CheckpointError, match=r"is shipped work .*; pass overwrite=True"):
        save_adapter(model, "task", target)
    assert (target.read_bytes() if target.exists() else None) == before


def test_fit_refuses_a_merged_lora_task():
    from minitransformer.tools import data
    model = Transformer(ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=16,
                                    n_heads=2, n_layers=1, d_ff=32))
    model.add_adapter("task", LoRAConfig(r=2))
    model.train_adapter("task")
    model.merge("task")
    with pytest.raises(ValueError, match=r"task 'task' is merged into the base weights .*unmerge\('task'\) before fit"):
        train.fit(model, data.load_task("agreement"), train.TrainConfig(steps=1, progress=False))


# ----------------------------------------------------------------------------- full disks


NOTEBOOK = ROOT / "notebooks" / "01_gradients_by_hand.ipynb"


def test_course_run_on_a_full_disk_leaves_the_notebook_and_its_hard_link_whole(tmp_path):
    nb = tmp_path / "nb.ipynb"
    shutil.copy(NOTEBOOK, nb)
    os.link(nb, tmp_path / "link.ipynb")  # a user's hard link: the same file
    before = nb.read_bytes()
    for target in ("nb.ipynb", "link.ipynb"):
        result = run("course", "run", "--overwrite", "--no-execute", str(tmp_path / target), tmp=tmp_path,
                     shell_prefix="ulimit -f 16")  # 16 KiB: the notebook is ~200 KB
        one_line(result, 1, f"{tmp_path / target}: File too large")
        assert nb.read_bytes() == (tmp_path / "link.ipynb").read_bytes() == before
    assert not no_temporaries(tmp_path)


def test_course_student_on_a_full_disk_leaves_no_half_written_notebook(tmp_path):
    out = tmp_path / "student"
    result = run("course", "student", str(out), tmp=tmp_path, shell_prefix="ulimit -f 16")  # 16 KiB: most copies are larger
    one_line(result, 1, "File too large")
    assert not out.exists() or not list(out.glob("*.ipynb"))  # all of them, or none
    assert not (out.exists() and no_temporaries(out))


def test_course_student_writes_over_its_own_copies_but_not_edited_ones(tmp_path):
    out = tmp_path / "student"
    assert run("course", "student", str(out), tmp=tmp_path).returncode == 0
    again = run("course", "student", str(out), tmp=tmp_path)  # the same copies: nothing lost
    assert again.returncode == 0, again.stderr
    mine = out / NOTEBOOK.name
    mine.write_text(mine.read_text().replace("raise NotImplementedError", "return 42", 1))
    edited = mine.read_bytes()
    one_line(run("course", "student", str(out), tmp=tmp_path), 2, f"holds {NOTEBOOK.name}, which is not the copy")
    assert mine.read_bytes() == edited
    assert run("course", "student", str(out), "--overwrite", tmp=tmp_path).returncode == 0
    assert mine.read_bytes() != edited


# ----------------------------------------------------------------------------- figures as one set


def test_figures_on_a_full_disk_name_the_file_and_leave_the_folder_as_it_was(tmp_path):
    out = tmp_path / "figs"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    result = run("figures", "--from-json", str(files.FIGURES / "results.json"), "--out", str(out), tmp=tmp_path,
                 shell_prefix="ulimit -f 32")  # results.json is ~600 KB
    one_line(result, 1, f"{out / 'results.json'}: File too large")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no half set, no staging left


def test_figures_interrupted_while_drawing_leave_the_old_set(tmp_path, monkeypatch):
    from minitransformer.tools import experiments, plots
    out = tmp_path / "figs"
    src = files.FIGURES / "results.json"
    assert experiments.main(["--from-json", str(src), "--out", str(out)]) == 0
    before = snapshot(out)
    results = json.loads(src.read_text())
    results["runs"][next(iter(results["runs"]))]["head"]["test_acc"] = 0.01  # another run's numbers
    other = tmp_path / "other.json"
    other.write_text(json.dumps(results))
    drawn = []

    def interrupted(name):
        def draw(res, path):
            drawn.append(name)
            if name == "ablation":  # the second figure: results.json and tradeoff.png are drawn
                raise KeyboardInterrupt
            return original[name](res, path)
        return draw
    original = {n: getattr(plots, n) for n in plots.NAMES}
    for name in plots.NAMES:
        monkeypatch.setattr(plots, name, interrupted(name))
    with pytest.raises(KeyboardInterrupt):
        experiments.main(["--from-json", str(other), "--out", str(out)])
    assert drawn == ["tradeoff", "ablation"]
    assert snapshot(out) == before and not no_temporaries(out)


def test_two_concurrent_writers_each_leave_a_whole_set(tmp_path):
    """Two processes write the same folder's set (a.txt and b.txt, with a pause between them);
    whichever comes last, the folder holds one writer's a and b, never a mix."""
    script = textwrap.dedent("""
        import sys, time
        from minitransformer.tools import files
        who = sys.argv[1]
        for _ in range(3):
            with files.written_together(sys.argv[2]) as stage:
                files.write_text(stage / "a.txt", who)
                time.sleep(0.2)
                files.write_text(stage / "b.txt", who)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, who, str(tmp_path / "set")], env=env(tmp_path))
             for who in ("one", "two")]
    for p in procs:
        assert p.wait(timeout=TIMEOUT) == 0
    a, b = (tmp_path / "set" / "a.txt").read_text(), (tmp_path / "set" / "b.txt").read_text()
    assert a == b and not no_temporaries(tmp_path / "set")


# ----------------------------------------------------------------------------- signals


def started(argv, tmp, marker=None, **extra):
    """A subprocess of `argv`; returns once `marker` appeared on its stdout (None: at once)."""
    p = subprocess.Popen(argv, cwd=ROOT, env=env(tmp, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    if marker is not None:
        for line in p.stdout:
            if marker in line:
                break
    return p


def finished(p):
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


SAVING = textwrap.dedent("""
    import sys, time
    from minitransformer.tools import cli, files

    def main(argv):
        def write(f):
            f.write(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        files.atomic_write(argv[0], write)
    sys.exit(cli.run("save", main, sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_a_save_removes_the_temporary_file(tmp_path, sig):
    target = tmp_path / "out.npz"
    target.write_bytes(b"the old file")
    p = started([sys.executable, "-c", SAVING, str(target)], tmp_path, marker="writing")
    os.killpg(p.pid, getattr(signal, sig))
    result = finished(p)
    signum = getattr(signal, sig)
    assert result.returncode == 128 + signum, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert ("interrupted" if sig == "SIGINT" else f"stopped by {sig}") in result.stderr
    assert target.read_bytes() == b"the old file" and not no_temporaries(tmp_path)


def test_sigterm_during_training_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    p = started([sys.executable, "-m", "minitransformer", "pretrain", "--steps", "100000", "--quiet",
                 "--out", str(out / "base.npz")], tmp_path)
    time.sleep(6)  # loaded and training (or, on a slow machine, still loading: 143 and one line too)
    os.killpg(p.pid, signal.SIGTERM)
    one_line(finished(p), 143, "SIGTERM")
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(tmp_path, delay):
    p = started([sys.executable, "-m", "minitransformer", "gradcheck"], tmp_path)
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    result = finished(p)
    if "Fatal Python error: init_import_site" in result.stderr:  # Python's own start, before any line
        pytest.skip("the signal came before Python itself had started (its site import)")  # of ours ran
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) <= 1  # before Python's own start: killed, no line at all
    assert result.returncode in (130, -signal.SIGINT), result.stderr


def test_ctrl_c_during_course_run_is_one_line_and_leaves_the_notebook(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nb = tmp_path / "slow.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("import time\ntime.sleep(60)")]), nb)
    before = nb.read_bytes()
    p = started([sys.executable, "-m", "minitransformer", "course", "run", "--overwrite", str(nb)], tmp_path)
    time.sleep(8)  # the kernel has started and runs the cell
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    result = finished(p)
    one_line(result, 130, "minitransformer course: interrupted")
    assert nb.read_bytes() == before


def test_a_bad_environment_variable_is_refused_before_work(tmp_path):
    for value, shown in (("\u00b2", "'\u00b2'"), ("100000", "'100000'"), ("0", "'0'")):
        result = run("gradcheck", tmp=tmp_path, MINITRANSFORMER_THREADS=value)
        one_line(result, 2, f"MINITRANSFORMER_THREADS: expected an integer number of threads from 1 to 256, got {shown}")
    one_line(run("gradcheck", tmp=tmp_path, MINITRANSFORMER_KEEP_MEMORY="yes"), 2,
             "MINITRANSFORMER_KEEP_MEMORY: expected 0 or 1, got 'yes'")
