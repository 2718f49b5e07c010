"""kvcake's engines: the code that runs :mod:`kvcake.methods` inside an inference engine.

Two engines share one methods layer:

- :mod:`kvcake.engines.transformers` — Hugging Face transformers (``kvcake.compress`` around ``generate``): the
  compressed cache, fixed-shape decoding slots, the attention wrapper and masks. The only code that imports
  transformers' model internals.
- :mod:`kvcake.engines.vllm` — vLLM, as a plugin (``additional_config={"kvcake": ...}``): an attention backend that
  scores and compacts each request's paged blocks, one KV-cache group per layer so per-layer budgets free per-layer
  blocks, and the block managers that return them to vLLM's pool. Imported only inside vLLM processes.

Both hand the methods the same things and get the same things back; the contract is written down in
:mod:`kvcake.methods`. Imports flow one way: applications → engines → methods.
"""
