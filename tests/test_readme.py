"""The README's own claims: its gradient snippet runs and passes, it stays short, and it speaks of
the project alone (no machine's absolute paths, no words about how the work is organised)."""
import re
from pathlib import Path

from minitransformer import gradcheck

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_check_one_gradient_snippet_runs_and_passes(capsys):
    text = README.read_text()
    section = text[text.index("## Check one gradient by hand"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    exec(compile(code, "README.md", "exec"), {})
    errors = eval(capsys.readouterr().out.strip())  # the dict it printed: {'x': ..., ...}
    assert set(errors) == {"x", "gamma", "beta"}
    assert all(err <= gradcheck.OP_THRESHOLD for err in errors.values()), errors


def test_the_readme_keeps_the_two_setup_commands():
    text = README.read_text()
    assert "pip install -r requirements.txt && python -m minitransformer " in text
    assert "pip install -r requirements.txt && python -m pytest " in text


def test_the_readme_is_short_and_speaks_of_the_project_alone():
    text = README.read_text()
    assert len(text.splitlines()) <= 210  # read in one go: the generated demo and results are most of it
    assert len(text) <= 12_200  # about 12,000 characters: the full results live in docs/results.md
    assert not re.search(r"/(work|home|root|Users)/\w", text), "an absolute path of one machine"
    assert not re.search(r"\b(the issue|this round|this session)\b", text, re.I)
