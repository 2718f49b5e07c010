"""``kvcake generate``: answer a question about a long context with a compressed KV cache.

The per-method options are generated from the method registry, so a new method's parameters appear here without an
edit; every argument is checked before torch and transformers are imported.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import typer

from kvcake.cli.common import BACKENDS, CLIError, app, check_attention, check_output_path, err, fail, one_line, out


def default_text(param) -> str:
    return "none" if param.default is None else str(param.default)



def _fixed_options() -> list[inspect.Parameter]:
    def option(name: str, kind: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)

    return [
        option("input", str, typer.Option(..., "--input", "-i", help="Context file, or - for standard input.")),
        option("question", str, typer.Option(..., "--question", "-q", help="Question about the context.")),
        option("method", str, typer.Option("cake", "--method", "-m", help="Method name (see `kvcake methods`).")),
        option("budget", int | None, typer.Option(None, "--budget", help="Tokens kept per layer, window included.")),
        option("ratio", float | None, typer.Option(None, "--ratio",
                                                      help="Fraction of the prompt's KV cache to keep, (0, 1].")),
        option("model", str | None, typer.Option(
            None, "--model", help="Local model folder or embedded model name (smollm2-135m-instruct, "
                                  "qwen2.5-coder-0.5b-instruct, gemma-3-270m); default: SmolLM2-135M.")),
        option("preset", str | None, typer.Option(None, "--preset",
                                                     help="Use the authors' published tau for this model name, or the "
                                                          "tau.json `kvcake calibrate` wrote (nearest budget or "
                                                          "ratio).")),
        option("one_shot", bool, typer.Option(False, "--one-shot",
                                              help="Allocate once after prefill instead of cascading.")),
        option("decode", bool | None, typer.Option(
            None, "--decode-eviction/--prefill-only",
            help="Hold the budget while generating, or evict at prefill only (default: the method's own).")),
        option("max_new_tokens", int, typer.Option(64, "--max-new-tokens", min=1, help="Most tokens to generate.")),
        option("protocol", str, typer.Option("whole", "--protocol", help="whole: compress the whole templated prompt "
                                             "(the paper's protocol); tail: leave the chat template's tail "
                                             "uncompressed (kvpress's).")),
        option("compile", bool, typer.Option(False, "--compile", help="Decode with compiled steps (torch.compile; "
                                             "CUDA graphs on CUDA). The first step pays the compile (tens of "
                                             "seconds on CPU); the full cache then uses transformers' static "
                                             "cache, compiled the same way.")),
        option("attn", str, typer.Option("sdpa", "--attn", help=f"Attention backend: {', '.join(BACKENDS)}.")),
        option("as_json", bool, typer.Option(False, "--json", help="Print one JSON object instead of text.")),
        option("plot", Path | None, typer.Option(None, "--plot", help="Also save a bar chart of tokens kept per "
                                                                         "layer (PNG).")),
    ]


def _parameter_help(name: str, owners: list) -> str:
    """What a method parameter means, which methods take it, and each one's default (they differ)."""
    text = next((p.help for _, p in owners if p.help), name)
    defaults: dict[str, list[str]] = {}
    for method, p in owners:
        defaults.setdefault(default_text(p), []).append(method)
    if len(defaults) == 1:
        (value, users), = defaults.items()
        return f"{text} (methods: {', '.join(users)}; default {value})."
    parts = "; ".join(f"{value} for {', '.join(users)}" for value, users in defaults.items())
    return f"{text} (default: {parts})."


def _method_options() -> list[inspect.Parameter]:
    from kvcake.methods.registry import all_parameters

    found = []
    for name, owners in all_parameters().items():
        if name in ("cascade", "decode_eviction"):  # --one-shot and --decode-eviction/--prefill-only
            continue
        kind = owners[0][1].kind
        flag = "--" + name.replace("_", "-")
        found.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind | None,
                                       default=typer.Option(None, flag, help=_parameter_help(name, owners))))
    return found


def _read_context(path: str) -> str:
    """The context text from a file or standard input, as UTF-8 (one clear error for anything else)."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read --input {path!r}: {exc.strerror or exc}") from None
    except AttributeError:  # a text-only stdin (tests, some shells)
        data = sys.stdin.read().encode("utf-8")
    if b"\x00" in data:
        raise CLIError(f"--input {path!r} is a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"--input {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise CLIError("empty context: give a non-empty text with --input")
    return text


def _build_method(name: str, budget, ratio, preset, one_shot, decode, params: dict[str, Any]):
    from kvcake.methods.cake import tau_preset
    from kvcake.methods.registry import build

    if name.lower() == "full":
        given = sorted(k for k, v in {**params, "budget": budget, "ratio": ratio}.items() if v is not None)
        if given:
            raise CLIError(f"--method full keeps the whole cache; it takes no {', '.join('--' + g for g in given)}")
        return None
    if (budget is None) == (ratio is None):
        raise CLIError("give exactly one of --budget TOKENS or --ratio R")
    if preset is not None:
        try:
            params["tau1"], params["tau2"] = tau_preset(preset, budget, ratio)
        except KeyError as exc:
            raise CLIError(str(exc.args[0])) from None
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    try:
        return build(name, budget=budget, ratio=ratio, cascade=False if one_shot else None, decode_eviction=decode,
                     **params)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


def generate(**options: Any) -> None:
    """Answer a question about a long context with a compressed KV cache, and report the memory it kept."""
    fixed = {p.name for p in _fixed_options()}
    params = {k: v for k, v in options.items() if k not in fixed}
    o = {k: v for k, v in options.items() if k in fixed}
    try:
        chosen = _build_method(o["method"], o["budget"], o["ratio"], o["preset"], o["one_shot"], o["decode"], params)
        check_attention(o["attn"])
        if o["protocol"] not in ("whole", "tail"):
            raise CLIError(f"unknown --protocol {o['protocol']!r}; use whole or tail")
        check_output_path(o["plot"], "--plot")
        context = _read_context(o["input"])
        if not o["question"].strip():
            raise CLIError("empty question")
    except CLIError as exc:
        fail(str(exc))
    _generate(chosen, context, o)


def _generate(chosen, context: str, o: dict[str, Any]) -> None:
    from transformers.utils import logging as transformers_logging

    from kvcake import models
    from kvcake.pipeline import PromptTooLongError, answer

    transformers_logging.disable_progress_bar()  # our own status line says what is loading

    try:
        with err.status("loading the model…"):
            lm, tokenizer = models.load(o["model"], attn_implementation=o["attn"])
    except (FileNotFoundError, OSError, ValueError, ImportError) as exc:
        fail(one_line(exc))
    try:
        with err.status("prefilling and generating…"):
            result = answer(lm, tokenizer, context, o["question"], chosen, max_new_tokens=o["max_new_tokens"],
                            protocol=o["protocol"], compile=o["compile"])
    except (ValueError, PromptTooLongError) as exc:
        fail(one_line(exc))
    name = o["model"] or models.DEFAULT_MODEL
    if o["as_json"]:
        payload = result.to_dict()
        payload["model"] = name
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        out.print(f"[bold]answer:[/bold] {result.answer}")
        _print_report(result)
    if o["plot"] is not None:  # optional output comes after the answer
        from kvcake.plots import plot_layer_budgets

        try:
            plot_layer_budgets(result.layer_budgets, result.prompt_tokens, o["plot"],
                               title=f"{result.method.get('name')} on {name}")
        except OSError as exc:
            fail(f"could not write --plot {str(o['plot'])!r}: {exc.strerror or exc}")
        err.print(f"per-layer plot written to {o['plot']}")


generate.__signature__ = inspect.Signature([*_fixed_options(), *_method_options()])  # type: ignore[attr-defined]
app.command("generate")(generate)

def _print_report(result) -> None:
    mib = 1 / 2**20
    out.print(f"method: {result.method.get('name')}   prompt tokens: {result.prompt_tokens}   "
              f"generated: {result.generated_tokens}   time: {result.seconds:.1f} s")
    budgets = result.layer_budgets
    out.print("tokens kept per layer after prefill: " + " ".join(str(b) for b in budgets))
    share = 100 * result.kv_bytes / max(result.kv_bytes_full, 1)
    out.print(f"KV memory after generation: {result.kv_bytes * mib:.2f} MiB of {result.kv_bytes_full * mib:.2f} MiB "
              f"full ({share:.1f}%); peak during prefill {result.peak_kv_bytes * mib:.2f} MiB")


