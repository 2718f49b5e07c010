"""The worker's side of the vLLM engine: every request's state, the batch of the current step, and what the step
tells the scheduler.

One :class:`Engine` per worker process, made by :class:`~kvcake.engines.vllm.worker.KVCakeWorker` and reached by the
attention backend through :func:`current` (vLLM builds backends itself and hands them no worker). A step goes:

1. ``begin_step`` (the worker, before the forward): requests that finished or were preempted are forgotten;
2. every layer's metadata builder asks :meth:`Engine.rows` for the batch and reads each request's region;
3. every layer's attention scores prompts that end in this step, and decodes over compacted regions; after the last
   layer, every layer's decode-time eviction runs in one batch and the prompts that ended are compacted
   (:func:`~kvcake.engines.vllm.requests.decode_layers`, :meth:`RequestState.compact`);
4. ``end_step`` (the worker, when it returns the step's output): each request whose first blocks changed, with its
   first block per layer, for the scheduler to free the blocks before them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvcake.engines.vllm.requests import Phase, RequestState
from kvcake.methods.base import Method

_CURRENT: Engine | None = None


@dataclass(frozen=True)
class Row:
    """One request of the step's batch, in batch order."""

    req_id: str
    computed: int  # tokens computed before this step
    scheduled: int  # tokens this step computes
    prompt: int  # prompt tokens

    @property
    def ends_prompt(self) -> bool:
        """The step computes the prompt's last token."""
        return self.computed < self.prompt <= self.computed + self.scheduled


class Engine:
    """Requests and step state of one worker (see the module docstring)."""

    def __init__(self, method: Method, block_size: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.method = method
        self.block_size = block_size
        self.reduce = reduce  # sums preference parts over tensor-parallel ranks (RequestState.reduce)
        self.layers: dict[str, int] = {}  # compressed layer name -> index, in model order
        self.requests: dict[str, RequestState] = {}
        self.runner: Any = None  # the model runner: its input batch gives the step's rows
        self._scheduled: dict[str, int] = {}
        self._rows: list[Row] | None = None
        self.first_blocks: dict[str, list[int]] = {}  # what this step tells the scheduler: first blocks that moved
        self.kept: dict[str, list[int]] = {}  # and the entries each layer kept, for prompts compacted in this step
        #: The decoding requests' new queries ``(R, Hq, D)`` per layer index, kept until the last layer has attended:
        #: every layer's decode-time eviction then runs in one batch (:func:`.requests.decode_layers`).
        self.queries: dict[int, torch.Tensor] = {}

    # -- the step ----------------------------------------------------------------------------------------------------
    def begin_step(self, scheduler_output: Any) -> None:
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        for req_id in gone:
            self.requests.pop(req_id, None)  # a preempted request is prefilled again from scratch
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self.requests.pop(req_id, None)
        self._scheduled = dict(scheduler_output.num_scheduled_tokens)
        self._rows = None
        self.queries = {}

    def rows(self) -> list[Row]:
        """The step's batch (read once from the model runner's persistent batch, which the forward runs)."""
        if self._rows is None:
            batch = self.runner.input_batch
            rows = []
            for index, req_id in enumerate(batch.req_ids):
                if req_id not in self._scheduled:
                    continue
                prompt = self.runner.requests[req_id].num_prompt_tokens
                rows.append(Row(req_id, int(batch.num_computed_tokens_cpu[index]), self._scheduled[req_id], prompt))
            self._rows = rows
        return self._rows

    def state(self, row: Row) -> RequestState:
        """The request's state, made when its prompt starts."""
        state = self.requests.get(row.req_id)
        if state is None or (row.computed == 0 and state.phase is Phase.DECODE):
            state = RequestState(self.method, row.prompt, len(self.layers), self.block_size, reduce=self.reduce)
            self.requests[row.req_id] = state
        return state

    def decoding(self, row: Row) -> RequestState | None:
        """The request's state if it decodes over compacted regions in this step."""
        state = self.requests.get(row.req_id)
        return state if state is not None and state.phase is Phase.DECODE and row.computed >= row.prompt else None

    def end_step(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """What the step tells the scheduler (first blocks that moved, entries kept by prompts compacted)."""
        report = (self.first_blocks, self.kept)
        self.first_blocks, self.kept = {}, {}
        return report


def install(engine: Engine) -> None:
    """Make ``engine`` the one this worker process's attention backend serves."""
    global _CURRENT
    _CURRENT = engine


def current() -> Engine | None:
    """The worker's engine, or None in a process where kvcake was not asked for."""
    return _CURRENT


__all__ = ["Engine", "Row", "current", "install"]
