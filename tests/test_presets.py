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


def test_set_params_go_over_the_preset(tmp_path):
    overrides = presets.parse_set_params(["pretrain.epochs=13", "pretrain.global_crops_scale=[0.8, 1.0]",
                                          "model.drop_path_rate=0.1"])
    assert overrides == {"pretrain": {"epochs": 13, "global_crops_scale": [0.8, 1.0]},
                         "model": {"drop_path_rate": 0.1}}
    params = presets.preset_params("fmnist-cpu", tmp_path, seed=1, overrides=overrides)
    assert (params["pretrain"]["epochs"], params["pretrain"]["global_crops_scale"]) == (13, [0.8, 1.0])
    assert params["pretrain"]["teacher_output"] == "sinkhorn"  # the preset's other keys stay
    assert params["model"]["drop_path_rate"] == 0.1


@pytest.mark.parametrize("pair, named", [("pretrain.epoch=13", "'pretrain.epoch'"),
                                         ("pretrain.epochs", "expected section.key=value"),
                                         ("pretrain.epochs=-1", "pretrain.epochs")])
def test_bad_set_param_exits_2_before_anything_runs(pair, named, tmp_path):
    result = subprocess.run([sys.executable, "-m", "stages.presets", "fmnist-cpu", "--run", "-S", pair,
                             "--dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
