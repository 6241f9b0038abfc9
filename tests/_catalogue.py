"""Helpers of the exercise catalogues (tests/test_exercises_0N.py)."""


def fails(result_of, reason, times=2):
    """result_of() FAILs in one line holding `reason` (or one of a tuple), on fresh cases each time."""
    for _ in range(times):
        result = result_of()
        text = repr(result)
        assert result.passed is False and text.startswith("FAIL ") and "\n" not in text, text
        reasons = reason if isinstance(reason, tuple) else (reason,)
        assert any(r in result.message for r in reasons), text


def passes(result_of, times=2):
    for _ in range(times):
        result = result_of()
        assert result.passed is True and "\n" not in repr(result), result
