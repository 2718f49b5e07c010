"""Compiled decoding (torch.compile, fullgraph) of a compressed model: one graph, no graph break, no recompilation
over 64 steps, and exactly the tokens of eager decoding (float32, CPU). Compiling costs seconds on CPU: these tests are
few and use a two-layer model; the whole method matrix is marked slow."""

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.compiled import CompileCounts
from kvcake.methods import registry

STEPS = 64


@pytest.fixture(scope="module")
def model():
    return tiny_llama("sdpa", layers=2)


def _make(name, budget):
    method = registry.entry(name).method
    window = {"window": 8} if method.default_window == 32 and method.window_for(budget) == 32 else {}
    return registry.build(name, budget=budget, **window)


def _generate(model, ids, mask, method, compiled):
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    if mask is not None:
        kwargs["attention_mask"] = mask
    with kvcake.compress(model, method, compile=compiled) as press:
        out = model.generate(ids, **kwargs)
        return out[:, ids.shape[1]:], press.report


def _padded_batch():
    ids = prompt(70, batch=3, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    mask[2, :40] = 0
    return ids, mask


def check(model, name, batch):
    ids, mask = _padded_batch() if batch == 3 else (prompt(70, seed=5), None)
    method = _make(name, 20)
    eager, eager_report = _generate(model, ids, mask, method, compiled=False)
    CompileCounts.start()
    compiled, report = _generate(model, ids, mask, method, compiled=True)
    counts = CompileCounts.read()
    assert torch.equal(compiled, eager), f"{name}: compiled decoding changed the tokens"
    assert counts.graph_breaks == 0 and counts.recompiles == 0 and counts.graphs == 1, counts
    assert report.kept_now == eager_report.kept_now and report.budgets == eager_report.budgets


@pytest.mark.parametrize("name, batch", [("cake", 1), ("cake", 3), ("snapkv", 1), ("h2o", 3)])
def test_compiled_decoding_equals_eager_with_one_graph(model, name, batch):
    check(model, name, batch)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", [m for m in registry.method_names() if m != "full"])
def test_every_method_compiles_to_one_graph_and_the_eager_tokens(model, name, batch):
    check(model, name, batch)


def test_compiled_decoding_keeps_the_buffers_in_place(model):
    # What CUDA graphs need: the decoding buffers are written in place at fixed addresses, step after step.
    ids = prompt(70, seed=5)
    CompileCounts.start()
    with kvcake.compress(model, _make("cake", 20), compile=True) as press, torch.no_grad():
        cache = press.new_cache()
        token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        addresses = [(layer.slots.keys.data_ptr(), layer.slots.positions.data_ptr()) for layer in cache.layers]
        for step in range(8):
            position = torch.tensor([[70 + step]])
            token = press.forward(token, cache=cache, position_ids=position).logits[:, -1:].argmax(-1)
        assert [(layer.slots.keys.data_ptr(), layer.slots.positions.data_ptr()) for layer in cache.layers] == addresses
        assert int(cache.layers[0].slots.cursor) == 78
    assert CompileCounts.read().graphs == 1


def test_new_requests_with_other_budgets_reuse_the_compiled_step(model):
    # CAKE's layer budgets depend on the prompt; the slot axis is dynamic, so a new request never recompiles.
    CompileCounts.start()
    with kvcake.compress(model, _make("cake", 30), compile=True) as press:
        budgets = []
        for n, seed in [(70, 1), (95, 2), (60, 3)]:
            model.generate(prompt(n, seed=seed), max_new_tokens=12, min_new_tokens=12, do_sample=False)
            budgets.append(press.report.budgets)
    assert len({str(b) for b in budgets}) > 1  # the requests really had different budgets
    assert CompileCounts.read().graphs == 1


def test_a_deeper_model_compiles_to_the_same_one_graph():
    # Every layer's decoding work is in the model's one graph: no graph and no recompilation per layer, the layer index
    # is never a guard. (Each layer's slot write and attention, and the batch's eviction, are calls of kvcake's
    # operators in that graph, not traced: test_the_compiled_step_leaves_the_work_over_slots_to_kvcakes_operators.)
    ids = prompt(70, seed=5)
    for layers in (1, 3):
        model = tiny_llama("sdpa", layers=layers, seed=3)
        eager, _ = _generate(model, ids, None, _make("cake", 20), compiled=False)
        CompileCounts.start()
        compiled, report = _generate(model, ids, None, _make("cake", 20), compiled=True)
        counts = CompileCounts.read()
        (budgets,) = report.budgets  # one row: each layer's budget, which differ between the layers
        assert len(budgets) == layers and (layers == 1 or len(set(budgets)) > 1)
        assert torch.equal(compiled, eager)
        assert counts.graphs == 1 and counts.graph_breaks == 0, (layers, counts)


def _traced_step(monkeypatch):
    """The one graph dynamo traced for a 3-layer model's compiled CAKE step (every layer in the group), and its
    inputs."""
    traced = []

    def capture(model, **kwargs):
        return _compile(model, fullgraph=True,
                        backend=lambda graph, inputs: traced.append((graph, inputs)) or graph.forward)

    _compile = torch.compile
    monkeypatch.setattr(torch, "compile", capture)
    model = tiny_llama("sdpa", layers=3, seed=3)
    with kvcake.compress(model, _make("cake", 20), compile=True) as press:
        model.generate(prompt(70, seed=5), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert len(press.last_cache.layer_groups) == 3  # the evicting layers' batch
    (step,) = traced
    return step


def test_no_two_inputs_of_the_compiled_step_share_memory(monkeypatch):
    # Inputs that are views of one tensor (each layer's row of a table) are indexed at their offsets inside the
    # compiled kernels, so each layer's otherwise identical kernel became one of its own: 27 more C++ kernels to
    # compile on SmolLM2 (docs/performance.md, issue 23's fifth session). A layer's tables are tensors of its own.
    _, traced = _traced_step(monkeypatch)
    inputs = [t for t in traced if isinstance(t, torch.Tensor)]
    storages = [t.untyped_storage().data_ptr() for t in inputs]
    assert len(inputs) > 40 and len(set(storages)) == len(storages)


def test_the_compiled_step_leaves_the_work_over_slots_to_kvcakes_operators(monkeypatch):
    # Each layer's slot axis is a dynamic size of its own. Traced, the slot write, the attention over the slots and the
    # eviction were operators over thirty such sizes, which made SmolLM2's compile 2.6 times the plain static cache's
    # (docs/performance.md, issue 23's sixth session). They are kvcake's operators (engines/transformers/ops.py): the
    # graph computes nothing of a slot-dependent shape itself; it hands the buffers to them, and views their results.
    graph, _ = _traced_step(monkeypatch)
    over_slots, kvcake_calls = set(), []
    for node in graph.graph.nodes:
        value = node.meta.get("example_value")
        values = value if isinstance(value, (tuple, list)) else [value]
        if node.op == "call_function" and str(node.target).startswith("kvcake."):
            kvcake_calls.append(str(node.target))
        elif node.op != "placeholder" and any(
                isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape) for v in values):
            over_slots.add(str(node.target))
    assert over_slots <= {"<built-in function getitem>", "view"}, over_slots
    assert sorted(set(kvcake_calls)) == ["kvcake.evict_group", "kvcake.slot_attention", "kvcake.slot_write"]
    assert kvcake_calls.count("kvcake.slot_attention") == kvcake_calls.count("kvcake.slot_write") == 3


@pytest.mark.slow
def test_a_request_whose_layers_drop_fewer_per_step_reuses_the_compiled_step():
    # With these 6 layers and budget, the first prompt's layers drop up to two entries a step (layers whose budget
    # shrinks as capped layers take a token more each step), the second's at most one. The step is traced for one
    # bound of every layer (CompiledShape), which the second request keeps: no recompilation, and the eager tokens
    # (eager decoding takes each layer's own bound).
    model = tiny_llama("sdpa", layers=6, seed=3)
    method = kvcake.CAKE(budget=58, window=8)
    # A third request answers with more tokens: a longer decode schedule, which is a dynamic size too.
    requests = [(prompt(60, seed=4), 12), (prompt(70, seed=1), 12), (prompt(70, seed=1), 20)]
    eager = []
    for ids, tokens in requests:
        with kvcake.compress(model, method) as press:
            eager.append(model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False))
            eager_drops = {layer.slots.max_drops for layer in press.last_cache.layers}
    assert eager_drops == {1}  # these requests alone would be traced for single drops and grouped
    CompileCounts.start()
    with kvcake.compress(model, method, compile=True) as press:
        for (ids, tokens), expected in zip(requests, eager, strict=True):
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            assert torch.equal(out, expected)
        assert {layer.slots.max_drops for layer in press.last_cache.layers} == {2}
    assert CompileCounts.read().graphs == 1


def test_decoding_past_the_sized_buffers_in_compiled_code_is_an_error_not_a_silent_overwrite(model):
    # Compiled steps cannot regrow their buffers; a loop that goes past the size it announced is flagged on the
    # device and raised at the next check instead of overwriting the oldest entry.
    with kvcake.compress(model, kvcake.SnapKV(budget=20, window=8), compile=True, max_new_tokens=3) as press, \
            torch.no_grad():
        cache = press.new_cache()
        token = model(prompt(60, seed=2), cache=cache).logits[:, -1:].argmax(-1)
        for step in range(6):
            position = torch.tensor([[60 + step]])
            token = press.forward(token, cache=cache, position_ids=position).logits[:, -1:].argmax(-1)
        with pytest.raises(RuntimeError, match="sized for"):
            _ = press.report
