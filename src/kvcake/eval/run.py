"""The run: a grid of settings over a model's samples in one or two modes and protocols, resumable, optionally
sharded, and answering several samples at once when asked (``batch_size``)."""

from __future__ import annotations

import json
import os
import signal
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcake.eval import metrics
from kvcake.eval.batching import answer_batch, batchable
from kvcake.eval.files import RECORD, EvalDataWarning, Shard, barrier, ends_mid_line, row_key, scan_predictions
from kvcake.eval.grid import Setting, check_run_options
from kvcake.eval.prompts import question_length
from kvcake.eval.record import (
    add_run,
    check_resume,
    default_parameters,
    finish_run,
    method_parameters,
    read_record,
    run_record,
)
from kvcake.eval.sample import EvalDataError, Sample
from kvcake.eval.summary import merge, write_metrics
from kvcake.pipeline import chat_tail_length


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While the run answers, SIGTERM (``kill``, a job scheduler's stop) stops it as Ctrl-C does, so that
    ``run.json`` records the run ``interrupted`` rather than leaving it ``running``. Only the main thread can
    take signals; elsewhere, and once the run ends, the handler in place before is kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def interleaved(samples: list[Sample]) -> list[tuple[int, Sample]]:
    """``(index, sample)`` of ``samples`` in rounds: the first sample of every task's every cell (length and depth),
    then the second of each, and so on, each round in the samples' order. The synthetic suites list a task's
    samples cell by cell (every repetition of depth 0, then of depth 0.25, ...), so a run answering in that order
    and stopped part-way would have seen only the first depths; in rounds it has seen all of them, and the
    difference it measures between two settings is not a few depths' difference. ``index`` is the position in
    ``samples`` (what a shard takes its samples by)."""
    seen: dict[tuple, int] = {}
    rounds = []
    for sample in samples:
        cell = (sample.task, sample.meta.get("length"), sample.meta.get("depth"))
        rounds.append(seen.get(cell, 0))
        seen[cell] = rounds[-1] + 1
    order = sorted(range(len(samples)), key=lambda i: (rounds[i], i))
    return [(i, samples[i]) for i in order]


@dataclass
class EvalRun:
    """Everything ``kvcake eval`` runs on one model: the samples, the grid, the modes and protocols, and where
    results go. ``batch_size`` samples of one task, mode and protocol are answered together
    (:func:`~kvcake.eval.batching.answer_batch`); 1 answers one sample at a time."""

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
    protocols: list[str] = field(default_factory=lambda: ["whole"])
    batch_size: int = 1

    def pending(self, done: set[str]) -> list[tuple[Sample, str, str, list[Setting]]]:
        """This shard's (sample, mode, protocol, settings still to answer), skipping rows already in ``done``, in
        :func:`interleaved` order: a run stopped part-way has answered a balanced part of every task and cell."""
        work = []
        for index, sample in interleaved(self.samples):
            if not self.shard.mine(index):
                continue
            for mode in self.modes:
                for protocol in self.protocols:
                    todo = [s for s in self.settings
                            if row_key(sample.task, sample.id, s.label, mode, protocol) not in done]
                    if todo:
                        work.append((sample, mode, protocol, todo))
        return work

    def batches(self, work: list[tuple[Sample, str, str, list[Setting]]]
                ) -> list[tuple[list[Sample], str, str, list[Setting]]]:
        """``work`` in batches of up to ``batch_size`` samples that share a task, mode, protocol and settings to
        answer, and in the query-agnostic mode the token length of the question (fed in one chunk after the
        compression, where padding cannot go); in the order of their first sample."""
        if self.batch_size <= 1 or not batchable(self.model):
            return [([sample], mode, protocol, todo) for sample, mode, protocol, todo in work]
        open_: dict[tuple, int] = {}  # a batch still filling, by what its samples share: its index in ``out``
        out: list[tuple[list[Sample], str, str, list[Setting]]] = []
        for sample, mode, protocol, todo in work:
            asked = question_length(self.tokenizer, sample) if mode == "query-agnostic" else None
            key = (sample.task, mode, protocol, tuple(s.label for s in todo), asked)
            if key not in open_:
                open_[key] = len(out)
                out.append(([], mode, protocol, todo))
            members = out[open_[key]][0]
            members.append(sample)
            if len(members) == self.batch_size:
                del open_[key]
        return out

    def answering(self) -> dict[str, Any]:
        """The answer-changing settings of this run that the run itself knows: the prompt and answer limits, the
        model's dtype and attention backend (:data:`~kvcake.eval.record.ANSWER_SETTINGS`) and every setting's full
        method parameters."""
        return {"dtype": str(next(self.model.parameters()).dtype),
                "attention": getattr(self.model.config, "_attn_implementation", None),
                "max_length": self.max_length, "max_new_tokens": self.max_new_tokens,
                "chat_tail": chat_tail_length(self.tokenizer), "methods": method_parameters(self.settings)}

    def check_rows(self, rows: list[dict[str, Any]]) -> None:
        """Refuse rows of this run's samples that answer another version of the sample (``sample_hash``)."""
        digests = {(s.task, str(s.id)): s.digest() for s in self.samples}
        for row in rows:
            want = digests.get((row["task"], str(row["id"])))
            have = row.get("sample_hash")
            if want is not None and have is not None and have != want:
                raise EvalDataError(
                    f"{self.out}: row {row['key']} answers another version of sample {row['task']} {row['id']} "
                    "(its prompt, references, answer length or chat rule differ): use another --out folder")

    def run(self) -> list[dict[str, Any]]:
        """Answer what is not answered yet, appending rows; returns every row of the folder (and, on rank 0,
        writes the metrics). A folder made under other answer-changing settings is refused before anything is
        written; ``run.json`` marks this run ``running``, then ``completed``, ``failed`` or ``interrupted``."""
        self.out.mkdir(parents=True, exist_ok=True)
        given = {**self.record, **self.answering(), "protocols": self.protocols, "batch_size": self.batch_size}
        previous = read_record(self.out)
        check_resume(previous, given, self.out / RECORD, default_parameters(self.settings))
        found = scan_predictions(self.out)
        self.check_rows(found.rows)
        if found.ignored:
            warnings.warn(f"{self.out}: left out {found.ignored_lines} line(s) of the predictions that are not rows "
                          "(torn by a killed run, or not a JSON object with a row's fields)", EvalDataWarning,
                          stacklevel=2)
        rank0 = self.shard.rank == 0
        record = add_run(self.out, given, previous, write=rank0, ignored_lines=found.ignored_lines)
        try:
            with _terminate_as_interrupt():
                done = {r["key"] for r in found.rows if self.retry_failed is False or not r.get("error")}
                self._append(self.pending(done))
                rows = self._finish()
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            finish_run(self.out, record, status, write=rank0, error=f"{type(exc).__name__}: {exc}")
            raise
        finish_run(self.out, record, "completed", write=rank0)
        return rows

    def _finish(self) -> list[dict[str, Any]]:
        """After every shard is done: rank 0 merges the shards and writes the metrics; returns the folder's rows.
        The other shards read the folder only after a second barrier: rank 0's merge removes the shard files, and a
        shard reading them meanwhile could list a file that is gone when it opens it."""
        barrier(self.shard)
        if self.shard.world == 1:
            rows = scan_predictions(self.out).rows
            write_metrics(self.out, rows)
            return rows
        rows = merge(self.out) if self.shard.rank == 0 else []  # one predictions.jsonl from the shards, and the metrics
        barrier(self.shard)
        return rows if self.shard.rank == 0 else scan_predictions(self.out).rows

    def _append(self, work: list[tuple[Sample, str, str, list[Setting]]]) -> None:
        """Answer ``work`` and append each row to this shard's predictions file as soon as it is answered (a
        batch's rows one by one, as each setting finishes)."""
        total = sum(len(todo) for *_, todo in work)
        bar = _progress(total, f"{self.record.get('model', 'model')} [{self.shard.rank}/{self.shard.world}]",
                        self.progress and total > 0)
        path = self.out / self.shard.filename
        torn = ends_mid_line(path)
        with path.open("a", encoding="utf-8") as f:
            if torn:  # a run killed mid-line: start on a fresh line (the torn one is ignored when read)
                f.write("\n")
            for samples, mode, protocol, todo in self.batches(work):
                for row in self._answer(samples, mode, protocol, todo):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    bar.update(1)
                    bar.set_postfix_str(f"{row['task']} {row['label']}", refresh=False)
        bar.close()

    def _answer(self, samples: list[Sample], mode: str, protocol: str,
                todo: list[Setting]) -> Iterator[dict[str, Any]]:
        for sample, setting, result in answer_batch(self.model, self.tokenizer, samples, todo, mode, self.eos,
                                                    self.max_length, self.max_new_tokens, protocol):
            row = {"key": row_key(sample.task, sample.id, setting.label, mode, protocol), "task": sample.task,
                   "id": sample.id, "mode": mode, "protocol": protocol, "metric": sample.metric,
                   "answers": sample.answers, "meta": sample.meta, "model": self.record.get("model"),
                   "sample_hash": sample.digest(), "label": setting.label, "method": setting.method,
                   "budget": setting.budget, "ratio": setting.ratio, "params": dict(setting.params)}
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


def _check_options(modes: list[str], device: str, dtype: str, protocols: list[str], batch_size: int) -> None:
    check_run_options(modes, device, dtype, protocols, batch_size)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU here")


def planned(model_name: str, settings: list[Setting], options, *, dtype: str, attn: str, max_length: int | None,
            max_new_tokens: int | None) -> dict[str, Any]:
    """The answer-changing settings of a run known before its model is loaded (the prompt limit only when given:
    by default it is the model's)."""
    plan = {"model": model_name, "seed": options.seed, "suite": options.to_dict(), "dtype": str(getattr(torch, dtype)),
            "attention": attn, "max_new_tokens": max_new_tokens, "methods": method_parameters(settings)}
    if max_length is not None:
        plan["max_length"] = max_length
    return plan


def evaluate(models: list[str | None], task_names: list[str], settings: list[Setting], modes: list[str], options,
             out: Path, *, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa",
             max_length: int | None = None, max_new_tokens: int | None = None, retry_failed: bool = False,
             progress: bool = True, protocols: list[str] | None = None, batch_size: int = 1) -> list[Path]:
    """Run the grid on each model; results go to ``out/<model>/``. Returns those folders.

    ``protocols``: ``whole`` (default) and/or ``tail`` (:data:`~kvcake.eval.answering.PROTOCOLS`); ``batch_size``:
    samples answered together (1: one at a time).

    Every folder that exists already is checked against this run's answer-changing settings before any model is
    loaded (:func:`~kvcake.eval.record.check_resume`).
    """
    from kvcake import models as registry_models
    from kvcake.eval.tasks import check, load_samples

    protocols = protocols or ["whole"]
    _check_options(modes, device, dtype, protocols, batch_size)
    tasks = check(task_names, options)
    names = [name or registry_models.DEFAULT_MODEL for name in models]
    for model_name in names:
        folder = out / Path(model_name).name
        plan = planned(model_name, settings, options, dtype=dtype, attn=attn, max_length=max_length,
                       max_new_tokens=max_new_tokens)
        check_resume(read_record(folder), plan, folder / RECORD, default_parameters(settings))
    shard = Shard.from_env()
    if device == "cuda" and shard.world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    folders = []
    for name, model_name in zip(models, names, strict=True):
        model, tokenizer = registry_models.load(name, dtype=getattr(torch, dtype), attn_implementation=attn,
                                                device_map=device if device != "cpu" else None)
        samples = load_samples(tasks, tokenizer, options)
        limit = max_length or getattr(model.config, "max_position_embeddings", None)
        folder = out / Path(model_name).name
        record = run_record(model_name, model, settings, modes, tasks, options.to_dict(),
                            {"max_length": limit, "max_new_tokens": max_new_tokens, "shards": shard.world})
        EvalRun(model, tokenizer, samples, settings, modes, folder, registry_models.eos_token_ids(model, tokenizer),
                record=record, max_length=limit, max_new_tokens=max_new_tokens, retry_failed=retry_failed,
                shard=shard, progress=progress, protocols=protocols, batch_size=batch_size).run()
        folders.append(folder)
        del model
    return folders
