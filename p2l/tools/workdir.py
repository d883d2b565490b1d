"""The default run folder of a config: `runs/<config.name>[_<variant>]` (`make train`, `make eval`).

    python -m p2l.tools.workdir experiments/brats.py:tiny   ->  runs/t2_tiny

Named after the config's name, not its file, so that configs of one model (experiments/brats.py
and mslub.py are both the T2 run) share one run; `p2l.tools.sweep` names its runs the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from p2l import config_file
from p2l.errors import P2LError


def run_name(spec: str) -> str:
    module, variant = config_file.load_config_module(spec)
    config = module.get_config(variant) if variant else module.get_config()
    return config.name + (f"_{variant}" if variant else "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m p2l.tools.workdir CONFIG [RUNS_ROOT]", file=sys.stderr)
        return 2
    try:
        print(Path(argv[1] if len(argv) == 2 else "runs") / run_name(argv[0]))
    except P2LError as err:
        print(f"p2l: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
