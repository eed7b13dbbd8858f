"""Named recipes: presets/<name>.yaml holds the keys a recipe changes in params.yaml.

    python -m stages.presets NAME --run [--seed N] [-S key=value ...] [--dir DIR]  # shard -> pretrain -> extract -> knn
    python -m stages.presets NAME --set-args        # as `dvc exp run -S key=value` args

--run writes DIR/params.yaml (params.yaml, the preset over it, then the `-S` values as `dvc exp
run -S` reads them, every path under DIR; default runs/NAME[-seedN][-key=value...]), runs the
four stages there one after the other and writes each stage's wall-clock seconds to
DIR/timings.json. Each stage resumes or skips as it does in the DAG (pretrain resumes from its
checkpoint), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from stages.atomic import write_json
from stages.params import ParamsError, validate_params

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"
STAGES = ("shard", "pretrain", "extract", "knn")


def load_preset(name: str) -> dict[str, Any]:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ParamsError(f"{path}: no such preset (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text()) or {}


def merge(base: dict, overlay: dict, where: str = "") -> dict:
    """overlay's keys over base's, section by section; a key base lacks is an error."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if key not in merged:
            raise ParamsError(f"preset key '{where}{key}' is not in params.yaml")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = merge(merged[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def flatten(overlay: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in overlay.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def parse_set_params(pairs: list[str]) -> dict:
    """`section.key=value` pairs (values read as YAML, as `dvc exp run -S` does) as an overlay."""
    overlay: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamsError(f"-S {pair!r}: expected section.key=value")
        *sections, leaf = key.split(".")
        node = overlay
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return overlay


def preset_params(name: str, directory: Path, seed: int | None = None, overrides: dict | None = None) -> dict:
    """params.yaml with the preset, then `overrides`, over it and every `paths` entry moved under
    `directory`."""
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), load_preset(name))
    params = merge(params, overrides or {})
    if seed is not None:
        params["pretrain"]["seed"] = seed
    params["paths"] = {key: str(directory / value) for key, value in params["paths"].items()}
    validate_params(params, f"preset {name}")
    return params


def run(name: str, directory: Path, seed: int | None, overrides: dict | None = None) -> dict[str, float]:
    params = preset_params(name, directory, seed, overrides)
    directory.mkdir(parents=True, exist_ok=True)
    params_file = directory / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    timings: dict[str, float] = {}
    for stage in STAGES:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", str(params_file)], cwd=ROOT)
        timings[stage] = round(time.perf_counter() - start, 1)
        if result.returncode != 0:
            raise SystemExit(f"preset {name}: stage {stage} failed (exit {result.returncode})")
        write_json(directory / "timings.json", timings)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.presets", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a file name under presets/ without .yaml")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--run", action="store_true", help="run shard, pretrain, extract and knn")
    action.add_argument("--set-args", action="store_true", help="print `-S key=value` arguments for dvc exp run")
    parser.add_argument("--seed", type=int, default=None, help="pretrain.seed for this run")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a value over the preset's, as in `dvc exp run -S` (repeatable)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="run folder (default runs/NAME[-seedN][-KEY=VALUE...])")
    args = parser.parse_args(argv)
    try:
        if args.set_args:
            overlay = load_preset(args.name)
            merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overlay)  # unknown keys fail here
            print(" ".join(f"-S '{key}={json.dumps(value)}'" for key, value in flatten(overlay)))
            return 0
        suffix = "" if args.seed is None else f"-seed{args.seed}"
        suffix += "".join(f"-{pair}" for pair in args.set_param)  # a changed recipe gets its own folder
        directory = (args.dir or ROOT / "runs" / f"{args.name}{suffix}").resolve()
        timings = run(args.name, directory, args.seed, parse_set_params(args.set_param))
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    knn = json.loads((directory / "metrics" / "knn.json").read_text())
    print(json.dumps({"preset": args.name, "seed": args.seed, "seconds": timings, **knn}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
