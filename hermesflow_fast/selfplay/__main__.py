"""``python -m hermesflow_fast.selfplay`` — what torchrun runs on every rank for ``hermesflow selfplay --nproc N``."""

import sys

from hermesflow_fast.errors import user_errors
from hermesflow_fast.selfplay.cli import selfplay_main

if __name__ == "__main__":
    with user_errors():
        code = selfplay_main(sys.argv[1:])
    raise SystemExit(code)
