"""The ``kvcake`` console entry point: the command line, or one line saying how to install it."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from kvcake.cli import main as cli_main
    except ImportError as exc:  # the library was installed without the command line's extras
        sys.stderr.write(f"error: kvcake's command line needs its extras ({exc.name} is missing): "
                         "pip install 'kvcake[cli]'\n")
        raise SystemExit(2) from None
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
