"""The shipped base and the demo: pretraining is deterministic, the shipped file loads, and the
demo runs end to end, proving the base unchanged and the reloaded adapter identical."""
import numpy as np
import pytest

from minitransformer import ModelConfig, backend
from minitransformer.tools import data, demo, files, pretrain
from minitransformer.tools.checkpoint import load_base
from minitransformer.tools.cli import UsageError


def test_pretraining_is_deterministic(tmp_path):
    cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=16, n_heads=2,
                      n_layers=1, d_ff=32, dropout=0.1)
    runs = [pretrain.pretrain(steps=5, seed=3, config=cfg, progress=False, log=None, n_texts=200)
            for _ in range(2)]
    (a, ra), (b, rb) = runs
    for (name, p), q in zip(a.named_parameters().items(), b.named_parameters().values()):
        assert np.array_equal(p.value, q.value), name
    assert ra["loss"] == rb["loss"] and 0 <= ra["acc"] <= 1
    assert ra["loss"] < np.log(data.VOCAB_SIZE) + 0.5  # near chance after 5 steps, but finite


def test_pretrain_command_writes_a_loadable_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "CORPUS", 300)  # the command's corpus size, kept small here
    out = tmp_path / "base.npz"
    assert pretrain.main(["--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert "held-out masked-token loss" in capsys.readouterr().out
    assert load_base(out).config == pretrain.BASE_CONFIG
    with pytest.raises(UsageError, match="--steps: expected a positive integer, got 0"):
        pretrain.main(["--steps", "0"])


def test_the_shipped_base():
    assert pretrain.BASE_PATH.is_file()
    assert pretrain.BASE_PATH.stat().st_size < 5e6
    model = pretrain.load_pretrained()
    assert model.config == pretrain.BASE_CONFIG and not model.adapters
    assert demo.digest(demo.base_checksums(model)) == pretrain.BASE_SHA256  # what the demo reports
    # it has learned the language: masked tokens far better than the unigram guess
    corpus = data.pretraining_corpus(300, seed=99)
    _, acc = pretrain.mlm_eval(model, corpus, np.random.default_rng(0))
    assert acc > 0.4


def test_checksums_see_any_change():
    model = pretrain.load_pretrained()
    before = demo.base_checksums(model)
    model.named_parameters()["blocks.2.ffn.b_1"].value[3] += np.float32(1e-7)
    after = demo.base_checksums(model)
    assert [n for n in before if before[n] != after[n]] == ["blocks.2.ffn.b_1"]
    assert demo.digest(before) != demo.digest(after)


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(files.ROOT)  # where the README says to run it
    out = tmp_path / "agreement.npz"
    with backend.using("fast"):  # as `python -m minitransformer` runs it
        assert demo.main(["--steps", "12", "--bottleneck", "4", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "from minitransformer/assets/base.npz: 214,883 parameters, the shipped base (sha256" in text
    assert str(files.ROOT) not in text  # paths relative to where it runs
    assert "base arrays are bit-for-bit unchanged" in text
    assert "identical predictions and logits" in text
    assert "trainable%" in text and "full fine-tuning" in text and "head only" in text
    assert "on the fast path" in text  # the command trains on the fast kernels, and says so
    assert out.is_file()


def test_demo_writes_its_readme_section_only_when_asked(tmp_path, capsys):
    """--readme replaces the text between the demo markers with the run's output; the rest of
    the file stays byte for byte."""
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- demo:start -->\nold\n<!-- demo:end -->\nafter\n")
    args = ["--steps", "12", "--bottleneck", "4", "--quiet", "--out", str(tmp_path / "a.npz"),
            "--readme", str(readme)]
    with backend.using("fast"):
        assert demo.main(args) == 0
    printed = capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith("# title\n<!-- demo:start -->\nWritten by `python -m minitransformer --steps 12")
    assert text.endswith("```\n<!-- demo:end -->\nafter\n") and "old" not in text
    assert "all 70 base arrays are bit-for-bit unchanged" in text
    assert text.count("identical predictions and logits") == 1 and "identical predictions" in printed


def test_demo_rejects_bad_options():
    with pytest.raises(UsageError, match="argument --task: invalid choice: 'nope'"):
        demo.main(["--task", "nope"])
    with pytest.raises(UsageError, match="--bottleneck: expected a positive integer"):
        demo.main(["--bottleneck", "0"])
