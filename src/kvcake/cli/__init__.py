"""The ``kvcake`` command line: one module per command group, all on one typer app.

Arguments are checked before torch and transformers are imported (the method layer loads torch on first use only):
``kvcake --help``, ``kvcake methods`` and every argument error answer in a fraction of a second.
"""

from __future__ import annotations

import os
import sys

from kvcake.cli import bench, evaluate, generate, info  # noqa: F401 - each registers its commands on the app
from kvcake.cli.common import app, err, one_line, sample_text


def main() -> None:
    """The console entry point: one line on stderr for anything that goes wrong, never a traceback (set
    KVCAKE_DEBUG=1 to see one)."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the command line
        if os.environ.get("KVCAKE_DEBUG"):
            raise
        err.print(f"error: {type(exc).__name__}: {one_line(exc)} (KVCAKE_DEBUG=1 shows the traceback)",
                  markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["app", "main", "sample_text"]
