"""The run: a grid of settings over a model's samples in one or two modes, resumable and optionally sharded."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcake.eval import metrics
from kvcake.eval.answering import MODES, answer_settings
from kvcake.eval.files import Shard, barrier, ends_mid_line, read_predictions, row_key
from kvcake.eval.grid import Setting
from kvcake.eval.record import run_record, write_record
from kvcake.eval.sample import Sample
from kvcake.eval.summary import merge, write_metrics


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
        """Answer what is not answered yet, appending rows; returns every row of the folder (and, on rank 0,
        writes the metrics)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_record(self.out, self.record, write=self.shard.rank == 0)
        existing = read_predictions(self.out)
        done = {r["key"] for r in existing if self.retry_failed is False or not r.get("error")}
        self._append(self.pending(done))
        barrier(self.shard)
        if self.shard.rank != 0:
            return read_predictions(self.out)
        if self.shard.world > 1:
            return merge(self.out)  # one predictions.jsonl from the shards, and the metrics
        rows = read_predictions(self.out)
        write_metrics(self.out, rows)
        return rows

    def _append(self, work: list[tuple[Sample, str, list[Setting]]]) -> None:
        """Answer ``work`` and append each row to this shard's predictions file as soon as it is answered."""
        total = sum(len(todo) for *_, todo in work)
        bar = _progress(total, f"{self.record.get('model', 'model')} [{self.shard.rank}/{self.shard.world}]",
                        self.progress and total > 0)
        path = self.out / self.shard.filename
        torn = ends_mid_line(path)
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="answer", disable=not enabled, dynamic_ncols=True)


def _check_options(modes: list[str], device: str, dtype: str) -> None:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU here")


def evaluate(models: list[str | None], task_names: list[str], settings: list[Setting], modes: list[str], options,
             out: Path, *, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa",
             max_length: int | None = None, max_new_tokens: int | None = None, retry_failed: bool = False,
             progress: bool = True) -> list[Path]:
    """Run the grid on each model; results go to ``out/<model>/``. Returns those folders."""
    from kvcake import models as registry_models
    from kvcake.eval.tasks import check, load_samples

    _check_options(modes, device, dtype)
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
