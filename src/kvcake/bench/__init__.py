"""Speed and memory benchmark: what eviction costs and saves, per prompt length and method.

For every (prompt length, method) pair :func:`run_bench` measures, separately and with the same random prompt:

* prefill time, without compression (``full``) and with each method (median over ``repeats`` after ``warmup``);
* time per decoded token (median of per-step times of a hand-written greedy loop with true positions), for the full
  cache, for each method, and for the *physical limit*: a plain ``DynamicCache`` that holds exactly as many tokens per
  layer as the compressed cache does (prefilled from a random prompt of that length), i.e. what decoding would cost if
  eviction had no overhead at all;
* memory: KV bytes after prefill and after decoding, the peak KV bytes during prefill for the cascade and for
  one-shot allocation (the method run once more with ``cascade=False``), the SPEC bound on the cascade's peak, and
  the process memory of each phase (peak RSS sampled by a background thread on CPU; ``torch.cuda.max_memory_allocated``
  on GPU).

Nothing is estimated: a figure that cannot be measured is stored as None and a note in the row says why. Each case
is one :class:`BenchRow`. :func:`write_results` writes JSON, CSV, a markdown report and plots;
:func:`summarise_targets` states the ratios the project cares about from measured rows only. :func:`bench` does all
of it for the command line.

Models are randomly initialised from named shapes (:data:`SHAPES`; speed does not depend on weight values) or loaded
from a local folder / the embedded default through :func:`kvcake.models.load`.

Modules: :mod:`~kvcake.bench.shapes` (models), :mod:`~kvcake.bench.probes` (process memory),
:mod:`~kvcake.bench.timing` (the measured loops and their schedule), :mod:`~kvcake.bench.row` (rows),
:mod:`~kvcake.bench.env` (hardware, sdpa kernel), :mod:`~kvcake.bench.summary`, :mod:`~kvcake.bench.writers` and
:mod:`~kvcake.bench.plots` (results), :mod:`~kvcake.bench.command` (all in one).
"""

from kvcake.bench.command import bench
from kvcake.bench.env import SDPA_BACKENDS, hardware, sdpa_backend
from kvcake.bench.probes import PhaseMemory, memory_fields
from kvcake.bench.probes import rss_reader as _rss_reader
from kvcake.bench.probes import trim_heap as _trim_heap
from kvcake.bench.row import MEANINGS, BenchRow, as_rows
from kvcake.bench.shapes import SHAPES, load_model, parameter_count, random_model, resolve_dtype, shape_config
from kvcake.bench.summary import MIB, summarise_targets
from kvcake.bench.timing.loops import decode as _decode
from kvcake.bench.timing.loops import greedy_steps
from kvcake.bench.timing.runner import run_bench
from kvcake.bench.writers import markdown_report, measurement_notes, write_results
from kvcake.engines.transformers.storage import cache_kv_bytes

__all__ = [
    "MEANINGS", "MIB", "SDPA_BACKENDS", "SHAPES", "BenchRow", "PhaseMemory", "as_rows", "bench", "cache_kv_bytes",
    "greedy_steps", "hardware", "load_model", "markdown_report", "measurement_notes", "memory_fields",
    "parameter_count", "random_model", "resolve_dtype", "run_bench", "sdpa_backend", "shape_config",
    "summarise_targets", "write_results", "_decode", "_rss_reader", "_trim_heap",
]
