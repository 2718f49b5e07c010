"""What every command of the command line shares: the consoles, one-line errors, argument checks."""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CAKE KV-cache eviction for Hugging Face models: generate, compare, measure.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


class CLIError(Exception):
    """A bad argument or input, reported as one line on stderr with exit code 2."""


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code=2)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def sample_text() -> str:
    return resources.files("kvcake").joinpath("data/sample.txt").read_text(encoding="utf-8")


def check_attention(attn: str) -> None:
    """A backend kvcake wraps, and its package installed (checked without importing torch)."""
    if attn not in BACKENDS:
        raise CLIError(f"unknown attention backend {attn!r}; use one of {', '.join(BACKENDS)}")
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attn)
    if package is not None and importlib.util.find_spec(package) is None:
        raise CLIError(f"--attn {attn} needs the {package} package, which is not installed; use --attn sdpa")


def check_output_path(path: Path | None, what: str) -> None:
    """A file we will write later must be writable now (never lose an answer to a late failure)."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a folder; give a file name")
    if not folder.is_dir():
        raise CLIError(f"{what} {str(path)!r}: no such folder {str(folder)!r}")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{what} {str(path)!r}: the folder is not writable")



def split(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]
