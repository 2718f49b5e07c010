"""How fast the command line answers --help, `kvcake methods` and a bad argument, against `import typer` alone.

    python benchmarks/cli_startup.py [--repeats 5]

Every command runs in a fresh interpreter; the figures are medians of wall-clock seconds, measured in one run so that
the ratios compare like with like on a loaded machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import typer'": [sys.executable, "-c", "import typer"],
    "kvcake --help": [sys.executable, "-m", "kvcake.cli", "--help"],
    "kvcake methods": [sys.executable, "-m", "kvcake.cli", "methods"],
    "kvcake generate --budget 0 (argument error)": [sys.executable, "-m", "kvcake.cli", "generate", "--input", "-",
                                                    "--question", "q", "--budget", "0"],
    "kvcake eval --tasks nope (argument error)": [sys.executable, "-m", "kvcake.cli", "eval", "--tasks", "nope"],
    "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers.cache_utils"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved rounds: a drifting load falls on every command alike
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, input="text", capture_output=True, text=True, check=False)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c 'import typer'"])
    print(f"| command | median seconds ({args.repeats} runs) | vs import typer |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
