"""One measured case of the benchmark, :class:`BenchRow`, and the dict form results.json and results.csv hold.

A row is written as a flat dict whose keys are the field names below, so that results written earlier stay readable
(:meth:`BenchRow.from_dict` reads them back; ``BenchRow.from_dict(d).to_dict() == d``). A few keys are written only
where they apply, exactly as rows have always been written:

* ``stored_per_layer``, ``kept_end_per_layer``, ``padding_bytes``: rows of a compressing method (not ``full``);
* ``sdpa_backend``: rows whose kernel choice was recorded (:func:`kvcake.bench.bench` records it; ``run_bench``
  alone does not know it);
* the compiled-decoding fields (``compiled`` and after): rows of a run with ``compile=True``.

A row is also a read-only mapping of those keys (``row["prefill_s"]``, ``row.get("notes")``), and item assignment
sets a field, so code written for the dict rows keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ALWAYS, METHODS, RECORDED, COMPILE = "always", "methods", "recorded", "compile"


def _col(meaning: str, written: str = ALWAYS) -> Any:
    return field(default=None, metadata={"meaning": meaning, "written": written})


def _memory(what: str) -> tuple[Any, Any, Any, Any]:
    return (_col(f"CPU: highest RSS during {what} (bytes)"), _col(f"CPU: RSS growth during {what} over its start"),
            _col(f"GPU: max_memory_allocated during {what} (bytes)"),
            _col(f"GPU: allocated growth during {what} over its start"))


_PRE = _memory("prefill")
_DEC = _memory("decoding")
_ONE = _memory("the one-shot prefill")


@dataclass
class BenchRow(Mapping[str, Any]):
    """Measurements of one (prompt length, method) case; None where a figure was not measured (``notes`` says why).

    Field order is the column order of results.csv. Times are seconds, memory bytes, token counts per layer.
    """

    model: str | None = _col("the model measured: a shape name, a folder, or 'embedded default'")
    dtype: str | None = _col("dtype of the weights and the cache, e.g. float32")
    attn_implementation: str | None = _col("transformers attention backend: sdpa, eager, flash_attention_2")
    device: str | None = _col("device the model ran on, e.g. cpu or cuda:0")
    budget: int | None = _col("tokens per layer each method keeps, window included (None: ratio given)")
    ratio: float | None = _col("fraction of the prompt each method keeps (None: budget given)")
    decode_tokens: int | None = _col("greedy steps timed after each prefill")
    repeats: int | None = _col("timed runs per case")
    warmup: int | None = _col("untimed runs per case before the timed ones")
    seed: int | None = _col("seed of the random prompts")
    length: int = field(default=0, metadata={"meaning": "prompt tokens", "written": ALWAYS})
    method: str = field(default="", metadata={"meaning": "registry name of the method ('full': no eviction)",
                                              "written": ALWAYS})
    notes: list[str] = field(default_factory=list, metadata={"meaning": "why a figure is empty, roundings, padding",
                                                             "written": ALWAYS})
    method_label: str | None = _col("what the method composes, e.g. ada-snapkv")
    cascade: bool | None = _col("the method allocates layer by layer during prefill (None for full)")
    decode_eviction: bool | None = _col("the method keeps evicting while decoding (None for full)")
    window: int | None = _col("the method's observation window S_w (None for full)")
    layers: int | None = _col("compressed layers (all layers for full)")
    bytes_per_token_layer: int | None = _col("key + value bytes of one token in one layer, all KV heads")
    prefill_s: float | None = _col("prefill seconds, median of the timed runs")
    prefill_s_runs: list[float] | None = _col("prefill seconds of every timed run")
    decode_step_s: float | None = _col("seconds per decoded token, median of all timed steps")
    decode_steps_s: list[float] | None = _col("seconds of every timed decoding step")
    kept_per_layer: list[int] | None = _col("real tokens each layer kept after prefill")
    kept_mean: float | None = _col("mean of kept_per_layer")
    kv_bytes_prefill: int | None = _col("KV bytes held after prefill")
    kv_bytes_end: int | None = _col("KV bytes held after decoding")
    kv_bytes_full_prefill: int | None = _col("KV bytes a cache without eviction holds after prefill")
    kv_bytes_full_end: int | None = _col("KV bytes a cache without eviction holds after decoding")
    metadata_bytes: int | None = _col("kvcake's position bookkeeping, not in kv_bytes_*")
    peak_kv_bytes_prefill: int | None = _col("highest KV bytes during prefill, as run (full: its final size)")
    peak_kv_bytes_one_shot: int | None = _col("the same with one-shot allocation (cascade=False)")
    peak_bound_bytes: int | None = _col("SPEC bound on the cascade's peak: B_total + (L-1)·S_w + one full layer")
    one_shot_prefill_s: float | None = _col("prefill seconds with cascade=False (one run)")
    one_shot_same_cache: bool | None = _col("one-shot kept exactly the cascade's tokens per layer and bytes")
    physical_limit_tokens: int | None = _col("tokens per layer of the plain cache standing for the compressed one")
    physical_limit_kv_bytes: int | None = _col("KV bytes of that plain cache after prefill")
    physical_limit_decode_step_s: float | None = _col("seconds per decoded token with that plain cache, median")
    physical_limit_decode_steps_s: list[float] | None = _col("seconds of every timed step with that plain cache")
    prefill_rss_peak_bytes: int | None = _PRE[0]
    prefill_rss_delta_bytes: int | None = _PRE[1]
    prefill_cuda_peak_bytes: int | None = _PRE[2]
    prefill_cuda_delta_bytes: int | None = _PRE[3]
    decode_rss_peak_bytes: int | None = _DEC[0]
    decode_rss_delta_bytes: int | None = _DEC[1]
    decode_cuda_peak_bytes: int | None = _DEC[2]
    decode_cuda_delta_bytes: int | None = _DEC[3]
    one_shot_prefill_rss_peak_bytes: int | None = _ONE[0]
    one_shot_prefill_rss_delta_bytes: int | None = _ONE[1]
    one_shot_prefill_cuda_peak_bytes: int | None = _ONE[2]
    one_shot_prefill_cuda_delta_bytes: int | None = _ONE[3]
    sdpa_backend: str | None = _col("sdpa kernel pinned for the run (None: PyTorch's choice)", RECORDED)
    stored_per_layer: list[int] | None = _col("entries stored per head and layer after prefill (Ada-KV pads)", METHODS)
    kept_end_per_layer: list[int] | None = _col("real tokens per layer after decoding", METHODS)
    padding_bytes: int | None = _col("Ada-KV filler slots, included in kv_bytes_*", METHODS)
    compiled: bool | None = _col("True: decoding through torch.compile; False: the eager row of a compiled run",
                                 COMPILE)
    compile_mode: str | None = _col("torch.compile mode of the compiled steps (default, reduce-overhead)", COMPILE)
    compile_s: float | None = _col("seconds of the first compiled step (the compilation), not in the medians",
                                   COMPILE)
    graph_breaks: int | None = _col("dynamo graph breaks from the first compiled step to the last timed one",
                                    COMPILE)
    recompiles: int | None = _col("dynamo recompilations (guard failures) during the timed compiled steps", COMPILE)
    physical_limit_compile_s: float | None = _col("compile_s of the compiled plain cache of the kept size", COMPILE)
    physical_limit_graph_breaks: int | None = _col("graph_breaks of the compiled plain cache of the kept size",
                                                   COMPILE)
    physical_limit_recompiles: int | None = _col("recompiles of the compiled plain cache of the kept size", COMPILE)
    sdpa_recorded: bool = field(default=False, repr=False, metadata={"meaning": "sdpa_backend was recorded"})

    # -- the dict form ------------------------------------------------------------------------------------------------
    def writes(self, name: str) -> bool:
        """Whether the key ``name`` belongs to this row's dict form."""
        written = _WRITTEN.get(name)
        if written == ALWAYS:
            return True
        if written == METHODS:
            return self.method != "full"
        if written == RECORDED:
            return self.sdpa_recorded
        if written == COMPILE:
            return self.compiled is not None
        return False

    def to_dict(self) -> dict[str, Any]:
        """The row as results.json holds it (lists copied)."""
        out: dict[str, Any] = {}
        for name in self:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchRow:
        """A row from its dict form (as :meth:`to_dict` wrote it); unknown keys are refused."""
        if isinstance(data, BenchRow):
            return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})
        unknown = [key for key in data if key not in _WRITTEN]
        if unknown:
            raise ValueError(f"unknown benchmark row keys {unknown}; known keys: {', '.join(_WRITTEN)}")
        values: dict[str, Any] = {k: list(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values, sdpa_recorded="sdpa_backend" in data)

    def record_sdpa_backend(self, name: str | None) -> None:
        """Record the sdpa kernel the row was measured with (None: PyTorch's choice)."""
        self.sdpa_backend = name
        self.sdpa_recorded = True

    # -- the mapping view ---------------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if not self.writes(key):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (name for name in _WRITTEN if self.writes(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in _WRITTEN:
            raise KeyError(f"{key!r} is not a benchmark row field")
        if key == "sdpa_backend":
            self.record_sdpa_backend(value)
        else:
            setattr(self, key, value)


#: Written key -> when it is written, in column order.
_WRITTEN: dict[str, str] = {f.name: f.metadata["written"] for f in fields(BenchRow) if "written" in f.metadata}

#: Written key -> its one-line meaning.
MEANINGS: dict[str, str] = {f.name: f.metadata["meaning"] for f in fields(BenchRow) if "written" in f.metadata}


def as_rows(rows: Iterable[Mapping[str, Any]]) -> list[BenchRow]:
    """Rows as :class:`BenchRow` (dict rows, e.g. read back from results.json, are converted; rows are kept)."""
    return [r if isinstance(r, BenchRow) else BenchRow.from_dict(r) for r in rows]
