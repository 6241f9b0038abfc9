"""What a file the commands read must hold: a small schema, checked field by field, so a bad file is
refused in one line that names the file and the field (`runs.topic.adapter_m2.test_acc: expected a
number from 0 to 1, got 'high'`), never met later as a TypeError deep inside the plotting.

    check(value, spec, "results.json")   # -> value, or SchemaError naming the field
    RESULTS                              # what figures --from-json needs from a results.json

A spec is a function (value, where) that raises SchemaError; build them with the helpers below.
Only the fields a reader uses are checked; other fields pass, whatever they hold.
"""
import math


class SchemaError(ValueError):
    """A file whose content is not what its reader needs; the message names the field."""


def _got(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number(low=-math.inf, high=math.inf, null=False):
    """A finite number (not a bool) in [low, high]; None too when `null`."""
    def spec(value, where):
        if value is None and null:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high:
            bounds = (f" from {low:g} to {high:g}" if math.isfinite(low) and math.isfinite(high)
                      else f" >= {low:g}" if math.isfinite(low) else "")
            raise SchemaError(f"{where}: expected a finite number{bounds}{' or null' if null else ''}, "
                              f"got {_got(value)}")
    return spec


def integer(low=0):
    def spec(value, where):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SchemaError(f"{where}: expected an integer >= {low}, got {_got(value)}")
    return spec


def string(value, where):
    if not isinstance(value, str) or not value:
        raise SchemaError(f"{where}: expected a non-empty string, got {_got(value)}")


def obj(fields=None, each=None, nonempty=False):
    """A JSON object holding every key of `fields` ({key: spec}); with `each`, every value
    matches that spec."""
    def spec(value, where):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected a JSON object, got {type(value).__name__} {_got(value)}")
        if nonempty and not value:
            raise SchemaError(f"{where}: expected at least one entry, got none")
        for key, sub in (fields or {}).items():
            if key not in value:
                raise SchemaError(f"{where}: expected the key {key!r}, got keys {sorted(value)[:8]}")
            sub(value[key], f"{where}.{key}")
        if each is not None:
            for key, item in value.items():
                each(item, f"{where}.{key}")
    return spec


def array(each, nonempty=False):
    def spec(value, where):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a JSON array, got {type(value).__name__} {_got(value)}")
        if nonempty and not value:
            raise SchemaError(f"{where}: expected at least one entry, got none")
        for i, item in enumerate(value):
            each(item, f"{where}[{i}]")
    return spec


def check(value, spec, where):
    """value, after spec(value, where); SchemaError names the field."""
    spec(value, where)
    return value


ACCURACY = number(0, 1)
RUN = obj({"method": string, "test_acc": ACCURACY, "val_acc": ACCURACY, "trained": integer(0),
           "pct": number(0, 100)})
RESULTS = obj({
    "settings": obj({"main_size": integer(1), "batch_size": integer(1)}),
    "base": obj({"n_parameters": integer(1)}),
    "tasks": obj(nonempty=True),
    "runs": obj(each=obj(each=RUN, nonempty=True), nonempty=True),
    "ablation": obj(each=obj({"size": integer(1), "grid": array(array(number(0, 1, null=True)), nonempty=True)})),
    "init_std": array(obj({"task": string, "seed": integer(0), "std": number(0), "test_acc": ACCURACY})),
    "curves": obj({"task": string}),
    "storage": obj({"T": array(integer(1), nonempty=True)}),
    "seconds": obj({"total": number(0)}),
})
