"""Fault 6: property-based fuzzing of params.yaml.

Invalid files are made from the valid tiny config by one to three mutations in different
sections: a value of the wrong type, a value out of range, an unknown key, a section that is not
a mapping, or a whole file that is not a mapping. Each must make `python -m stages.shard` (its
in-process `main`) exit 2 with every mutated key named on stderr and nothing written. Files whose
sections or keys are merely left out (defaults apply) or hold other valid values must validate.
tests/test_params.py holds the hand-picked cases through every stage's command line."""

from __future__ import annotations

import contextlib
import io
import os
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages import shard
from stages.params import Params, load_params
from tiny_config import tiny_params, write_params

pytestmark = pytest.mark.faults

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (section, key) -> (kind, argument); the kinds below say what is valid for each.
KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    ("dataset", "shard_max_samples"): ("int", (1, None)),
    ("dataset", "jpeg_quality"): ("int", (1, 100)),
    ("dataset", "num_workers"): ("int", (0, None)),
    ("dataset", "val_fraction"): ("float", (0.0, False, 1.0, True)),  # (lo, lo included, hi, hi included)
    ("dataset", "max_bad_fraction"): ("float", (0.0, True, 1.0, True)),
    ("dataset", "image_format"): ("choice", ("png", "jpg")),
    ("model", "arch"): ("choice", ("vit_tiny", "vit_small", "vit_base", "resnet50")),
    ("model", "patch_size"): ("int", (1, None)),
    ("model", "drop_path_rate"): ("float", (0.0, True, 1.0, False)),
    ("pretrain", "epochs"): ("int", (1, None)),
    ("pretrain", "global_crops_number"): ("int", (1, 2)),
    ("pretrain", "lr"): ("float", (0.0, False, None, False)),
    ("pretrain", "momentum_teacher"): ("float", (0.0, True, 1.0, True)),
    ("pretrain", "clip_grad"): ("float", (0.0, True, None, False)),
    ("pretrain", "optimizer"): ("choice", ("adamw", "sgd", "lars")),
    ("pretrain", "on_preempt"): ("choice", ("requeue", "exit")),
    ("pretrain", "norm_last_layer"): ("bool", None),
    ("extract", "pooling"): ("choice", ("cls", "last_blocks", "cls_avgpool", "gem", "multiscale")),
    ("extract", "batch_size"): ("int", (1, None)),
    ("knn", "temperature"): ("float", (0.0, False, None, False)),
    ("knn", "baselines"): ("bool", None),
    ("paths", "metrics"): ("str", None),
    ("paths", "checkpoints"): ("str", None),
}
SECTIONS = sorted(Params.model_fields)
words = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
containers = st.one_of(st.lists(st.integers(0, 9), max_size=2), st.dictionaries(words, st.integers(0, 9), max_size=2))


def wrong_type(kind: str, argument: Any) -> st.SearchStrategy:
    """Values of a type the strict schema refuses for `kind` (no coercion from strings)."""
    if kind == "int":
        return st.one_of(words, st.booleans(), finite, containers, st.none())
    if kind == "float":
        return st.one_of(words, st.booleans(), containers, st.none())
    if kind == "choice":
        return st.one_of(st.integers(), st.booleans(), containers, st.none())
    if kind == "bool":
        return st.one_of(st.integers(), words, containers, st.none())
    return st.one_of(st.integers(), finite, st.booleans(), containers, st.none())  # str


def out_of_range(kind: str, argument: Any) -> st.SearchStrategy | None:
    """Values of the right type outside what the key allows (None: the type has no range)."""
    if kind == "int":
        lo, hi = argument
        below = st.integers(max_value=lo - 1)
        return below if hi is None else st.one_of(below, st.integers(min_value=hi + 1))
    if kind == "float":
        lo, lo_in, hi, hi_in = argument
        below = st.floats(max_value=lo, exclude_max=lo_in, allow_nan=False, allow_infinity=False, min_value=-1e6)
        if hi is None:
            return below
        return st.one_of(below, st.floats(min_value=hi, exclude_min=hi_in, allow_nan=False, max_value=1e6))
    if kind == "choice":
        return words.filter(lambda w: w not in argument)
    return None


def bad_value(item: tuple[tuple[str, str], tuple[str, Any]]) -> st.SearchStrategy:
    (section, key), (kind, argument) = item
    options = [wrong_type(kind, argument)]
    ranged = out_of_range(kind, argument)
    if ranged is not None:
        options.append(ranged)
    return st.one_of(options).map(lambda value: ("value", section, key, value))


def unknown_key() -> st.SearchStrategy:
    """A key the schema does not have, in a section or at the top level ('' section)."""
    def pick(section: str) -> st.SearchStrategy:
        model = Params if section == "" else Params.model_fields[section].annotation
        known = set(model.model_fields)
        return st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True).filter(lambda n: n not in known).map(
            lambda name: ("unknown", section, name, 1))

    return st.sampled_from(["", *SECTIONS]).flatmap(pick)


def garbled_section() -> st.SearchStrategy:
    return st.tuples(st.sampled_from(SECTIONS), st.one_of(st.integers(), words, st.lists(st.integers(), max_size=2))).map(
        lambda t: ("garble", t[0], None, t[1]))


mutation = st.one_of(st.sampled_from(sorted(KEYS.items())).flatmap(bad_value), unknown_key(), garbled_section())
mutations = st.lists(mutation, min_size=1, max_size=3, unique_by=lambda m: m[1])


def apply(params: dict, changes: list[tuple]) -> list[str]:
    """Mutate `params` in place; return what the error must say about each mutated key
    (stages.params words it as "<file>: <key> = <value>: <why>" or "unknown key '<key>'")."""
    named = []
    for what, section, key, value in changes:
        if what == "value":
            params[section][key] = value
            named.append(f": {section}.{key} = ")
        elif what == "unknown":
            (params if section == "" else params.setdefault(section, {}))[key] = value
            named.append(f"unknown key '{key if section == '' else f'{section}.{key}'}'")
        else:
            params[section] = value
            named.append(f": {section} = ")
    return named


def run_shard(directory: Path, params: Any) -> tuple[int, str]:
    """`python -m stages.shard --params <file>` in process, from `directory`."""
    params_file = directory / "params.yaml"
    write_params(params_file, params)
    stderr = io.StringIO()
    cwd = os.getcwd()
    os.chdir(directory)  # were a bad file accepted, its relative default paths land here
    try:
        with contextlib.redirect_stderr(stderr):
            code = shard.main(["--params", str(params_file)])
    finally:
        os.chdir(cwd)
    return code, stderr.getvalue()


@FUZZ
@given(changes=mutations)
def test_invalid_params_exit_2_naming_every_key_and_write_nothing(changes: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        params = tiny_params(directory)
        named = apply(params, changes)
        code, stderr = run_shard(directory, params)
        assert code == 2, (changes, stderr)
        assert stderr.startswith("error: invalid params"), stderr
        for key in named:
            assert key in stderr, (key, stderr)
        assert [p.name for p in directory.rglob("*")] == ["params.yaml"]


@FUZZ
@given(top=st.one_of(st.lists(st.integers(), max_size=3), st.integers(), words))
def test_a_file_that_is_not_a_mapping_exits_2(top: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code, stderr = run_shard(Path(tmp), top)
        assert code == 2 and "(top level)" in stderr, stderr
        assert [p.name for p in Path(tmp).iterdir()] == ["params.yaml"]


def good_value(kind: str, argument: Any) -> st.SearchStrategy:
    if kind == "int":
        lo, hi = argument
        return st.integers(lo, hi if hi is not None else lo + 1000)
    if kind == "float":
        lo, lo_in, hi, hi_in = argument
        return st.floats(lo, hi if hi is not None else 1e3, exclude_min=not lo_in, exclude_max=not hi_in)
    if kind == "choice":
        return st.sampled_from(argument)
    if kind == "bool":
        return st.booleans()
    return words


@FUZZ
@given(
    values=st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), max_size=6).flatmap(
        lambda chosen: st.fixed_dictionaries({k: good_value(*KEYS[k]) for k in chosen})),
    dropped_sections=st.sets(st.sampled_from([s for s in SECTIONS if s != "dataset"]), max_size=4),
    dropped_keys=st.sets(st.sampled_from(sorted(KEYS)), max_size=4),
)
def test_valid_files_validate(values: dict, dropped_sections: set, dropped_keys: set) -> None:
    """Valid values, and sections or keys left out (their defaults apply), pass validation."""
    with tempfile.TemporaryDirectory() as tmp:
        params = tiny_params(Path(tmp))
        for (section, key), value in values.items():
            params[section][key] = value
        if values.get(("pretrain", "lr"), 1.0) < 1e-6:
            params["pretrain"]["min_lr"] = 0.0  # pretrain.min_lr must stay <= pretrain.lr
        for section, key in dropped_keys:
            params.get(section, {}).pop(key, None)
        for section in dropped_sections:
            params.pop(section, None)
        if "model" in params:  # model.img_size must stay a whole number of patches (default 16)
            params["model"]["img_size"] = 4 * params["model"].get("patch_size", 16)
        loaded = load_params(write_params(Path(tmp) / "params.yaml", params))
        for (section, key), value in values.items():
            if section in dropped_sections or (section, key) in dropped_keys:
                default = Params.model_fields[section].default_factory().__getattribute__(key)
                assert getattr(getattr(loaded, section), key) == default
            else:
                assert getattr(getattr(loaded, section), key) == value
