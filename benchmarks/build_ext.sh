#!/usr/bin/env bash
# Compile the C extensions in place for the python3 on PATH, for runs from a source tree without an
# install (the device scripts: the device image's Python, no network). `pip install -e .` does the
# same from pyproject.toml's [[tool.setuptools.ext-modules]], whose compiler flags these repeat.
set -eu
include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
gcc -O3 -ffp-contract=off -shared -fPIC -I"$include" stages/dino/_pillow_ops.c -o "stages/dino/_pillow_ops$suffix"
gcc -O3 -shared -fPIC -I"$include" stages/_knn_select.c -o "stages/_knn_select$suffix"
