"""The thin command-line shell every stage shares: `python -m stages.<name> [--params FILE]`.

Exit status: 0 done; 1 the stage failed (bad data, non-finite loss, ...; the message names the file,
sample or step); 2 params.yaml is invalid (nothing was written)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from stages.params import Params, ParamsError, load_params

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_BAD_PARAMS = 2


class StageError(RuntimeError):
    """A stage cannot finish; the message says why and names the offending input."""


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_stage(name: str, run: Callable[[Params], Any], argv: list[str] | None = None) -> int:
    """Parse --params, validate the whole file, run the stage; map failures to exit codes."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: invalid params\n{exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    try:
        run(params)
    except StageError as exc:
        logger.error("stage %s failed: %s", name, exc)
        return EXIT_FAILED
    return 0
