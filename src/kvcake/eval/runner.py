"""Run a grid of methods × budgets over evaluation samples on one model, resumably, optionally sharded.

For every sample the prompt is prefilled once and every method's cache is rebuilt from that prefill
(:mod:`kvcake.integration.replay`), which is exact: the compressed prefill gives the same cache as a forward under
that method. Answers are greedy. Two modes:

* ``query-aware`` (the paper's setting): the whole prompt, question included, is prefilled and compressed;
* ``query-agnostic``: the context is prefilled and compressed alone, then the question is fed to the compressed
  cache, as a server that compresses a document before knowing the question would.

Both modes tokenise ``prefix + context`` and ``question`` separately, so they see the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcake.eval import metrics
from kvcake.eval.sample import Sample
from kvcake.integration.cache import KVCakeCache, cache_kv_bytes
from kvcake.integration.replay import queries_needed, record_prefill, replay
from kvcake.integration.session import cache_keyword, compress
from kvcake.methods import registry

MODES = ("query-aware", "query-agnostic")
SPLIT = "\x00kvcake-question\x00"


# -- the grid --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One method at one budget (``budget`` tokens per layer, or ``ratio`` of the compressed prompt)."""

    method: str
    budget: int | None = None
    ratio: float | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        size = f"b{self.budget}" if self.budget is not None else f"r{self.ratio:g}"
        extra = "".join(f",{k}={v}" for k, v in self.params)
        return f"{self.method}@{size}{extra}"

    def build(self):
        return registry.build(self.method, budget=self.budget, ratio=self.ratio, **dict(self.params))


def grid(methods: Iterable[str], budgets: Iterable[int] = (), ratios: Iterable[float] = (),
         params: dict[str, dict[str, Any]] | None = None) -> list[Setting]:
    """Every method at every budget and ratio (``full`` once); validates names and parameters."""
    budgets, ratios, params = list(budgets), list(ratios), params or {}
    settings: list[Setting] = []
    for name in methods:
        name = name.lower()
        if name == "full":
            settings.append(Setting("full"))
            continue
        if not budgets and not ratios:
            raise ValueError(f"method {name!r} needs at least one budget or ratio")
        extra = tuple(sorted(params.get(name, {}).items()))
        settings += [Setting(name, budget=b, params=extra) for b in budgets]
        settings += [Setting(name, ratio=r, params=extra) for r in ratios]
    for s in settings:
        s.build()  # fail before any model work on an unknown method or a bad parameter
    if len({s.label for s in settings}) != len(settings):
        raise ValueError("the grid names a method and budget twice")
    return settings


# -- prompts ---------------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    context_ids: torch.Tensor  # (1, n): template head, prefix and context
    question_ids: torch.Tensor  # (1, m): question and template tail (generation prompt)
    truncated: int  # context tokens removed from the middle

    @property
    def length(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def _split_template(tokenizer, sample: Sample, context: str) -> tuple[str, str, bool]:
    """The prompt text before and after the context/question boundary, and whether to add special tokens."""
    if sample.chat and getattr(tokenizer, "chat_template", None):
        content = sample.prefix + context + SPLIT + sample.question
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(SPLIT)
        return head, tail, False
    return sample.prefix + context, sample.question, True


def encode(tokenizer, sample: Sample, max_length: int | None = None) -> Encoded:
    """Token ids of ``sample``'s prompt, the context cut in the middle (as LongBench does) to fit ``max_length``."""
    head, tail, special = _split_template(tokenizer, sample, sample.context)
    ids = tokenizer(head, add_special_tokens=special, return_tensors="pt")["input_ids"]
    q_ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"]
    removed = 0
    if max_length is not None and ids.shape[1] + q_ids.shape[1] > max_length:
        ctx = tokenizer(sample.context, add_special_tokens=False)["input_ids"]
        over = ids.shape[1] + q_ids.shape[1] - max_length
        for _ in range(3):  # re-tokenising the joined halves can shift a token or two
            keep = max(0, len(ctx) - over - removed)
            removed = len(ctx) - keep
            text = tokenizer.decode(ctx[: keep // 2]) + tokenizer.decode(ctx[len(ctx) - (keep - keep // 2):])
            head, tail, special = _split_template(tokenizer, sample, text)
            ids = tokenizer(head, add_special_tokens=special, return_tensors="pt")["input_ids"]
            over = ids.shape[1] + q_ids.shape[1] - max_length
            if over <= 0:
                break
        if over > 0:
            raise ValueError(f"{sample.task}/{sample.id}: the prompt without its context exceeds {max_length} tokens")
    return Encoded(ids, q_ids, removed)


# -- generation ------------------------------------------------------------------------------------------------------
def _attached(model, method):
    """``method`` attached to ``model`` for a block (nothing for the full cache)."""
    return compress(model, method) if method is not None else contextlib.nullcontext()


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, position: int, method, max_new_tokens: int,
           eos: Iterable[int]) -> list[int]:
    """Greedy continuation from ``logits`` (the last prompt position's) with ``cache`` holding ``position`` tokens.

    Positions are passed explicitly: a compressed cache holds fewer entries than the sequence is long.
    """
    stop = set(eos)
    tokens: list[int] = []
    keyword = cache_keyword(model)
    device = logits.device
    with _attached(model, method):
        nxt = int(logits[0].argmax())
        while nxt not in stop and len(tokens) < max_new_tokens:
            tokens.append(nxt)
            if len(tokens) == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[nxt]], device=device), position_ids=torch.tensor([[position]], device=device),
                        **{keyword: cache}, use_cache=True, logits_to_keep=1)
            position += 1
            nxt = int(out.logits[0, -1].argmax())
    return tokens


@torch.no_grad()
def feed(model, cache, ids: torch.Tensor, position: int, method) -> torch.Tensor:
    """Run ``ids`` on top of ``cache`` (the question after a compressed context); the last position's logits."""
    positions = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
    with _attached(model, method):
        out = model(input_ids=ids, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True,
                    logits_to_keep=1)
    return out.logits[:, -1].float()


def answer_settings(model, tokenizer, sample: Sample, settings: list[Setting], mode: str, eos: list[int],
                    max_length: int | None = None,
                    max_new_tokens: int | None = None) -> Iterator[tuple[Setting, dict[str, Any] | Exception]]:
    """Answer ``sample`` under every setting, sharing one prefill; prompts are cut to ``max_length`` tokens
    including the answer.

    Yields ``(setting, result)`` per setting, ``result`` being the exception when that setting failed; a failed
    prefill fails every setting.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
    try:
        device = next(model.parameters()).device
        limit = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
        enc = encode(tokenizer, sample, None if max_length is None else max_length - limit)
        ctx, question = enc.context_ids.to(device), enc.question_ids.to(device)
        prefill_ids = torch.cat([ctx, question], dim=1) if mode == "query-aware" else ctx
        rest = None if mode == "query-aware" or question.shape[1] == 0 else question
        methods = [s.build() for s in settings]
        recorded = next((i for i, m in enumerate(methods) if m is not None), 0)
        start = time.perf_counter()
        record, first_cache = record_prefill(model, prefill_ids, methods[recorded], queries=queries_needed(methods))
        prefill_seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded per sample by the caller
        for setting in settings:
            yield setting, exc
        return
    for i, (setting, method) in enumerate(zip(settings, methods)):
        begin = time.perf_counter()
        try:
            cache = first_cache if i == recorded else replay(model, record, method)
            after_prefill = _memory(cache)
            logits, position = record.logits, prefill_ids.shape[1]
            if rest is not None:
                logits = feed(model, cache, rest, position, method)
                position += rest.shape[1]
            tokens = greedy(model, cache, logits, position, method, limit, eos)
        except Exception as exc:  # noqa: BLE001
            yield setting, exc
            continue
        yield setting, {
            "prediction": tokenizer.decode(tokens, skip_special_tokens=True), "generated_tokens": len(tokens),
            "prompt_tokens": enc.length, "compressed_tokens": prefill_ids.shape[1], "truncated_tokens": enc.truncated,
            "seconds": round(time.perf_counter() - begin + prefill_seconds / len(settings), 3),
            **after_prefill, "kv_bytes_end": cache_kv_bytes(cache),
        }


def _memory(cache) -> dict[str, Any]:
    if isinstance(cache, KVCakeCache):
        report = cache.report()
        return {"kv_bytes": report.kv_bytes, "kv_bytes_full": report.kv_bytes_full,
                "layer_kept": report.kept_after_prefill[0], "layer_preferences": report.preferences[0]}
    full = cache_kv_bytes(cache)
    return {"kv_bytes": full, "kv_bytes_full": full, "layer_kept": [layer.get_seq_length() for layer in cache.layers],
            "layer_preferences": None}


# -- the run: files, resuming, shards ------------------------------------------------------------------------------
PREDICTIONS = "predictions"
RECORD = "run.json"


def row_key(task: str, sample_id: str, label: str, mode: str) -> str:
    return f"{task}|{sample_id}|{label}|{mode}"


def read_predictions(folder: Path) -> list[dict[str, Any]]:
    """Every row of every predictions file in ``folder`` (shards included); the last row of a key wins."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob(f"{PREDICTIONS}*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a torn last line: that sample is simply redone.
                    continue
                rows[row["key"]] = row
    return list(rows.values())


@dataclass
class Shard:
    """This process's part of a sharded run (torchrun / accelerate launch set RANK and WORLD_SIZE)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def filename(self) -> str:
        return f"{PREDICTIONS}.jsonl" if self.world == 1 else f"{PREDICTIONS}.rank{self.rank}.jsonl"

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank


def barrier(shard: Shard) -> None:
    """Wait for every shard (gloo on CPU, NCCL on GPUs) so that rank 0 merges complete results."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dist.barrier()


@dataclass
class EvalRun:
    """Everything ``kvcake eval`` runs on one model: the samples, the grid, the modes, and where results go."""

    model: Any
    tokenizer: Any
    samples: list[Sample]
    settings: list[Setting]
    modes: list[str]
    out: Path
    eos: list[int]
    record: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    max_new_tokens: int | None = None
    retry_failed: bool = False
    shard: Shard = field(default_factory=Shard)
    progress: bool = True

    def pending(self, done: set[str]) -> list[tuple[Sample, str, list[Setting]]]:
        """This shard's (sample, mode, settings still to answer), skipping rows already in ``done``."""
        work = []
        for index, sample in enumerate(self.samples):
            if not self.shard.mine(index):
                continue
            for mode in self.modes:
                todo = [s for s in self.settings if row_key(sample.task, sample.id, s.label, mode) not in done]
                if todo:
                    work.append((sample, mode, todo))
        return work

    def run(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_record()
        existing = read_predictions(self.out)
        done = {r["key"] for r in existing if self.retry_failed is False or not r.get("error")}
        work = self.pending(done)
        total = sum(len(todo) for *_, todo in work)
        bar = _progress(total, f"{self.record.get('model', 'model')} [{self.shard.rank}/{self.shard.world}]",
                        self.progress and total > 0)
        path = self.out / self.shard.filename
        torn = _ends_mid_line(path)
        with path.open("a", encoding="utf-8") as f:
            if torn:  # a run killed mid-line: start on a fresh line (the torn one is ignored when read)
                f.write("\n")
            for sample, mode, todo in work:
                for row in self._answer(sample, mode, todo):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    bar.update(1)
                    bar.set_postfix_str(f"{sample.task} {row['label']}", refresh=False)
        bar.close()
        barrier(self.shard)
        if self.shard.rank != 0:
            return read_predictions(self.out)
        if self.shard.world > 1:
            return merge(self.out)  # one predictions.jsonl from the shards, and the metrics
        rows = read_predictions(self.out)
        write_metrics(self.out, rows)
        return rows

    def _answer(self, sample: Sample, mode: str, todo: list[Setting]) -> Iterator[dict[str, Any]]:
        base = {"task": sample.task, "id": sample.id, "mode": mode, "metric": sample.metric, "answers": sample.answers,
                "meta": sample.meta, "model": self.record.get("model")}
        for setting, result in answer_settings(self.model, self.tokenizer, sample, todo, mode, self.eos,
                                               self.max_length, self.max_new_tokens):
            row = {"key": row_key(sample.task, sample.id, setting.label, mode), **base, "label": setting.label,
                   "method": setting.method, "budget": setting.budget, "ratio": setting.ratio,
                   "params": dict(setting.params)}
            if not isinstance(result, Exception):
                try:
                    row.update(result, score=metrics.score(sample, result["prediction"]), error=None)
                except Exception as exc:  # noqa: BLE001 - a metric failing on one answer
                    result = exc
            if isinstance(result, Exception):  # one failing sample is recorded and the run goes on
                row.update(prediction=row.get("prediction"), score=None, error=f"{type(result).__name__}: {result}",
                           traceback="".join(traceback.format_exception(result, limit=-4)))
            yield row

    def _write_record(self) -> None:
        """Write ``run.json``: what the folder's rows come from. Every run into the folder is listed under ``runs``
        (start, command, commit, tasks, modes, settings, answer cap); methods, tasks, modes and settings are the
        union over the runs."""
        path = self.out / RECORD
        record = dict(self.record)
        this_run = {key: record.pop(key, None) for key in RUN_KEYS}
        this_run.update(tasks=record.get("tasks"), modes=record.get("modes"), settings=record.get("settings"))
        previous = json.loads(path.read_text()) if path.is_file() else {}
        for key in ("model", "seed", "suite"):
            if key in previous and previous[key] != record.get(key):
                raise ValueError(f"{path} was written for {key}={previous[key]!r}, not {record.get(key)!r}: "
                                 "use another --out folder, or the same settings to resume")
        for key in ("tasks", "modes", "settings"):
            record[key] = list(dict.fromkeys(previous.get(key, []) + (record.get(key) or [])))
        record["methods"] = {**previous.get("methods", {}), **record.get("methods", {})}
        record["runs"] = [r for r in previous.get("runs", []) if isinstance(r, dict)] + [this_run]
        if self.shard.rank == 0:
            path.write_text(json.dumps(record, indent=2) + "\n")


#: Fields of a run record that belong to one invocation (kept per run in ``run.json``'s ``runs``).
RUN_KEYS = ("started", "command", "git_commit", "versions", "host", "max_length", "max_new_tokens", "shards")


def _ends_mid_line(path: Path) -> bool:
    """Whether ``path`` exists and its last byte is not a newline (a run was killed while writing)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="answer", disable=not enabled, dynamic_ncols=True)


# -- metrics -----------------------------------------------------------------------------------------------------------
def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score per (model, mode, label, task) and the average over tasks; failed rows are counted, not scored."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("model"), r["mode"], r["label"], r["task"]), []).append(r)
    table = []
    for (model, mode, label, task), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        ok = [r for r in members if r.get("error") is None]
        first = members[0]
        table.append({
            "model": model, "mode": mode, "label": label, "method": first["method"], "budget": first["budget"],
            "ratio": first["ratio"], "task": task, "samples": len(ok), "failed": len(members) - len(ok),
            "score": round(sum(r["score"] for r in ok) / len(ok), 2) if ok else None,
            "kv_fraction": round(sum(r["kv_bytes"] / r["kv_bytes_full"] for r in ok) / len(ok), 4) if ok else None,
        })
    # The average runs over the tasks every setting of a (model, mode) has a score for, so that averages compare
    # like with like when some settings ran on more tasks than others; ``tasks`` says how many.
    scored_tasks: dict[tuple, dict[str, set[str]]] = {}
    for t in table:
        if t["score"] is not None:
            scored_tasks.setdefault((t["model"], t["mode"]), {}).setdefault(t["label"], set()).add(t["task"])
    common = {group: set.intersection(*labels.values()) for group, labels in scored_tasks.items()}
    averages: dict[tuple, list[dict[str, Any]]] = {}
    for t in table:
        averages.setdefault((t["model"], t["mode"], t["label"]), []).append(t)
    for (model, mode, label), members in averages.items():
        shared = common.get((model, mode), set())
        scored = [t for t in members if t["score"] is not None and t["task"] in shared]
        first = members[0]
        table.append({
            "model": model, "mode": mode, "label": label, "method": first["method"], "budget": first["budget"],
            "ratio": first["ratio"], "task": "average", "samples": sum(t["samples"] for t in members),
            "failed": sum(t["failed"] for t in members), "tasks": len(scored),
            "score": round(sum(t["score"] for t in scored) / len(scored), 2) if scored else None,
            "kv_fraction": round(sum(t["kv_fraction"] for t in scored) / len(scored), 4) if scored else None,
        })
    return table


def write_metrics(folder: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``metrics.json`` and ``metrics.csv`` (per task and average) for the rows of ``folder``."""
    import csv

    table = summarise(rows)
    (folder / "metrics.json").write_text(json.dumps(table, indent=2) + "\n")
    with (folder / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        columns = ["model", "mode", "label", "method", "budget", "ratio", "task", "tasks", "samples", "failed",
                   "score", "kv_fraction"]
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(table)
    return table


def merge(folder: Path) -> list[dict[str, Any]]:
    """Merge the shards' prediction files of ``folder`` into one ``predictions.jsonl`` and write the metrics."""
    rows = read_predictions(folder)
    rows.sort(key=lambda r: (r["task"], str(r["id"]), r["mode"], r["label"]))
    tmp = folder / f".{PREDICTIONS}.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(folder / f"{PREDICTIONS}.jsonl")
    for shard in folder.glob(f"{PREDICTIONS}.rank*.jsonl"):
        shard.unlink()
    write_metrics(folder, rows)
    return rows


def run_record(model_name: str, model, settings: list[Setting], modes: list[str], tasks: list[str],
               options: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """What a run was: versions, model, method parameters, suite settings, seed, commit, command."""
    import datetime
    import platform
    import subprocess
    import sys

    import transformers

    import kvcake

    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=False,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    config = model.config
    return {
        "model": model_name,
        "architecture": type(model).__name__,
        "layers": getattr(config, "num_hidden_layers", None),
        "dtype": str(next(model.parameters()).dtype),
        "attention": getattr(config, "_attn_implementation", None),
        "methods": {s.label: (s.build().parameters() if s.method != "full" else {"name": "full"}) for s in settings},
        "settings": [s.label for s in settings],
        "modes": modes,
        "tasks": tasks,
        "suite": options,
        "seed": options.get("seed"),
        "versions": {"kvcake": kvcake.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "git_commit": commit,
        "command": " ".join(sys.argv),
        "host": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                 "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def evaluate(models: list[str | None], task_names: list[str], settings: list[Setting], modes: list[str], options,
             out: Path, *, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa",
             max_length: int | None = None, max_new_tokens: int | None = None, retry_failed: bool = False,
             progress: bool = True) -> list[Path]:
    """Run the grid on each model; results go to ``out/<model>/``. Returns those folders."""
    from kvcake import models as registry_models
    from kvcake.eval.tasks import check, load_samples

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU here")
    tasks = check(task_names, options)
    shard = Shard.from_env()
    if device == "cuda" and shard.world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    folders = []
    for name in models:
        model_name = name or registry_models.DEFAULT_MODEL
        model, tokenizer = registry_models.load(name, dtype=getattr(torch, dtype), attn_implementation=attn,
                                                device_map=device if device != "cpu" else None)
        samples = load_samples(tasks, tokenizer, options)
        limit = max_length or getattr(model.config, "max_position_embeddings", None)
        folder = out / Path(model_name).name
        record = run_record(model_name, model, settings, modes, tasks, options.to_dict(),
                            {"max_length": limit, "max_new_tokens": max_new_tokens, "shards": shard.world})
        EvalRun(model, tokenizer, samples, settings, modes, folder, registry_models.eos_token_ids(model, tokenizer),
                record=record, max_length=limit, max_new_tokens=max_new_tokens, retry_failed=retry_failed,
                shard=shard, progress=progress).run()
        folders.append(folder)
        del model
    return folders
