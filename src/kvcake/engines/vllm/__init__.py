"""The vLLM engine: kvcake's methods inside vLLM's own server, as an installed plugin (not a fork).

Turn it on with vLLM's own configuration, the method's name and parameters as ``kvcake methods`` lists them::

    from vllm import LLM
    from kvcake.engines.vllm import engine_args
    llm = LLM(model, **engine_args("cake", ratio=0.1))     # additional_config={"kvcake": {...}} and kvcake's classes

or ``kvcake serve MODEL --method cake --ratio 0.1`` (vLLM's OpenAI server with the same settings). See docs/vllm.md.

How it fits in vLLM 0.32 (every piece is one of vLLM's extension points):

* :func:`register`, the ``vllm.general_plugins`` entry point, runs in every vLLM process: it tells vLLM which block
  manager serves kvcake's KV-cache spec, and puts kvcake's attention backend in place of ``CPU_ATTN``, which is
  vLLM's own CPU attention unless kvcake is asked for: nothing changes unless asked.
* :class:`~kvcake.engines.vllm.worker.KVCakeWorker` (``worker_cls``) gives every compressed layer a KV-cache spec of
  its own, hence its own group and block table over vLLM's one pool, and installs the attention backend
  (:mod:`~kvcake.engines.vllm.backend`), which scores, compacts and decodes through :mod:`kvcake.methods`.
* :class:`~kvcake.engines.vllm.scheduler.KVCakeScheduler` (``scheduler_cls``) frees the blocks each step emptied.
  The worker decides the budgets during the forward; they reach the scheduler only in the step's output
  (:class:`~kvcake.engines.vllm.worker.KVCakeRunnerOutput`), never through shared state.

vLLM 0.32 gives a plugin no way to choose the scheduler and worker classes from ``additional_config``, so the
engine needs ``scheduler_cls`` and ``worker_cls`` beside it; :func:`engine_args` and ``kvcake serve`` set all three,
and a vLLM that has one without the others refuses to start (:mod:`~kvcake.engines.vllm.settings`).
"""

from __future__ import annotations

from kvcake.engines.vllm.settings import SCHEDULER_CLS, WORKER_CLS, KVCakeConfigError, engine_args


def register() -> None:
    """The ``vllm.general_plugins`` entry point (called by vLLM in each of its processes)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from kvcake.engines.vllm import blocks

    blocks.register()
    register_backend(AttentionBackendEnum.CPU_ATTN, "kvcake.engines.vllm.backend.KVCakeCPUBackend")


__all__ = ["SCHEDULER_CLS", "WORKER_CLS", "KVCakeConfigError", "engine_args", "register"]
