"""``kvcake sample`` and ``kvcake methods``."""

from __future__ import annotations

import sys

from rich.table import Table

from kvcake.cli.common import app, out, sample_text
from kvcake.cli.generate import default_text


@app.command()
def sample() -> None:
    """Print the bundled sample text (a short story with facts to ask about)."""
    sys.stdout.write(sample_text())


@app.command()
def methods() -> None:
    """List the methods and their parameters (defaults are each paper's)."""
    from kvcake.methods.registry import entry, method_names

    table = Table("method", "what it is", "parameters (defaults)")
    for name in method_names():
        found = entry(name)
        params = ", ".join(f"{p.name}={default_text(p)}" for p in found.parameters())
        budget = "--budget TOKENS | --ratio R; " if found.method is not None else ""
        table.add_row(name, found.about, budget + params)
    out.print(table)


# -- generate: fixed options, then one per method parameter found in the registry -------------------------------------
