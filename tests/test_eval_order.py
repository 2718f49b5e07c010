"""The order a run answers its samples in: rounds over every task's cells, so that a run stopped part-way has a
balanced part of each task and depth (the paired comparison of two settings is then not a few depths' one)."""

from pathlib import Path

import pytest

from kvcake.eval import runner
from kvcake.eval.files import Shard
from kvcake.eval.run import interleaved
from kvcake.eval.sample import EvalDataError, Sample


def _samples() -> list[Sample]:
    """Two tasks listed cell by cell as the synthetic suites list them: 2 depths x 3 repetitions, and a task without
    depths (3 samples)."""
    out = [Sample(task="needlebench/single", id=f"L2000_D{d:g}_R{r}", context="c", question="q", answers=["a"],
                  metric="contains", max_new_tokens=4, meta={"length": 2000, "depth": d})
           for d in (0.0, 0.5) for r in range(3)]
    out += [Sample(task="ruler/vt", id=f"L2000_R{r}", context="c", question="q", answers=["a"], metric="contains",
                   max_new_tokens=4, meta={"length": 2000}) for r in range(3)]
    return out


def test_interleaved_takes_one_sample_of_every_cell_per_round():
    samples = _samples()
    order = [s.id for _, s in interleaved(samples)]
    assert order == ["L2000_D0_R0", "L2000_D0.5_R0", "L2000_R0",
                     "L2000_D0_R1", "L2000_D0.5_R1", "L2000_R1",
                     "L2000_D0_R2", "L2000_D0.5_R2", "L2000_R2"]
    assert sorted(i for i, _ in interleaved(samples)) == list(range(len(samples)))  # every sample, once
    assert all(samples[i] is s for i, s in interleaved(samples))  # the index is the sample's own


def test_pending_answers_in_rounds_and_shards_keep_their_samples(tmp_path: Path):
    samples = _samples()
    settings = runner.grid(["full", "cake"], budgets=[64])
    run = runner.EvalRun(None, None, samples, settings, ["query-aware"], tmp_path, [], progress=False)
    done = {runner.row_key("needlebench/single", "L2000_D0_R0", "full", "query-aware")}
    work = run.pending(done)
    assert [s.id for s, *_ in work][:3] == ["L2000_D0_R0", "L2000_D0.5_R0", "L2000_R0"]
    assert [s.label for s in work[0][3]] == ["cake@b64"]  # what is done is not answered again
    # The first four answered cover both depths of the single needle, not only depth 0.
    assert {s.meta["depth"] for s, *_ in work[:4] if "depth" in s.meta} == {0.0, 0.5}
    run.shard = Shard(rank=1, world=2)  # a shard takes the samples at its indices, whatever the order
    assert sorted(s.id for s, *_ in run.pending(set())) == sorted(samples[i].id for i in range(1, 9, 2))


def test_a_sharded_environment_is_checked_before_the_work(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert Shard.from_env() == Shard(0, 1)
    # WORLD_SIZE without RANK used to run as rank 0 (half the samples, another shard's among them) and fail only
    # when it met the other shards at the end.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(EvalDataError, match="RANK, MASTER_ADDR, MASTER_PORT are not set: launch with torchrun"):
        Shard.from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(EvalDataError, match="MASTER_PORT is not set"):
        Shard.from_env()
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert Shard.from_env() == Shard(1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(EvalDataError, match="RANK=2 is not a shard of WORLD_SIZE=2"):
        Shard.from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(EvalDataError, match="must be whole numbers"):
        Shard.from_env()
