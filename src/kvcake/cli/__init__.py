"""The ``kvcake`` command line: one module per command group, all on one typer app.

Arguments are checked before torch and transformers are imported (the method layer loads torch on first use only):
``kvcake --help``, ``kvcake methods`` and every argument error answer in a fraction of a second.
"""

from __future__ import annotations

import os
import sys

from kvcake.cli import bench, calibrate, evaluate, generate, info, serve  # noqa: F401 - each registers its commands on the app
from kvcake.cli.common import app, err, one_line, sample_text


def main(argv: list[str] | None = None) -> None:
    """The console entry point: one line on stderr for anything that goes wrong, never a traceback (set
    KVCAKE_DEBUG=1 to see one). Bad arguments exit with code 2, other failures with 1."""
    import typer

    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="kvcake", standalone_mode=False)
        if isinstance(code, int) and code:  # an exit the command asked for (typer.Exit), returned by the parser
            sys.exit(code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the command line
        if _usage_error(exc):  # a bad option or value, found by the parser
            ctx = getattr(exc, "ctx", None)
            where = f" (see kvcake {ctx.info_name} --help)" if ctx is not None and ctx.parent is not None else ""
            message = " ".join(str(exc.format_message()).split())  # type: ignore[attr-defined]
            if message:  # (no message: the help was shown, as for a bare ``kvcake``)
                err.print(f"error: {message}{where}", markup=False, highlight=False)
            sys.exit(2)
        if os.environ.get("KVCAKE_DEBUG"):
            raise
        err.print(f"error: {type(exc).__name__}: {one_line(exc)} (KVCAKE_DEBUG=1 shows the traceback)",
                  markup=False, highlight=False)
        sys.exit(1)


def _usage_error(exc: Exception) -> bool:
    """A command-line parser's usage error (typer's click raises them with exit code 2 and a message)."""
    return getattr(exc, "exit_code", None) == 2 and callable(getattr(exc, "format_message", None))


__all__ = ["app", "main", "sample_text"]
