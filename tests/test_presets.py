"""presets/: every recipe is valid params once laid over params.yaml; the command line."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import presets
from stages.params import ParamsError, validate_params

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))


def test_there_are_presets():
    assert {"fmnist-cpu", "fmnist-gpu"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_is_valid_with_every_path_in_its_folder(name, tmp_path):
    params = presets.preset_params(name, tmp_path, seed=3)
    validate_params(params)
    assert params["pretrain"]["seed"] == 3
    assert all(Path(path).is_relative_to(tmp_path) for path in params["paths"].values())
    overlay = presets.load_preset(name)
    for key, value in presets.flatten(overlay):
        section, *rest = key.split(".")
        got = params[section]
        for part in rest:
            got = got[part]
        assert got == value, key


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"'pretrain\.epoch'"):
        presets.merge({"pretrain": {"epochs": 1}}, {"pretrain": {"epoch": 2}})
    with pytest.raises(ParamsError, match="no such preset .*known: .*fmnist-cpu"):
        presets.load_preset("nope")


def test_set_args_round_trip():
    out = subprocess.run([sys.executable, "-m", "stages.presets", "fmnist-cpu", "--set-args"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    args = shlex.split(out)
    assert args[0::2] == ["-S"] * (len(args) // 2)
    pairs = dict(arg.split("=", 1) for arg in args[1::2])
    overlay = dict(presets.flatten(presets.load_preset("fmnist-cpu")))
    assert {key: yaml.safe_load(value) for key, value in pairs.items()} == overlay


def test_unknown_preset_exits_2():
    result = subprocess.run([sys.executable, "-m", "stages.presets", "nope", "--run"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no such preset" in result.stderr
