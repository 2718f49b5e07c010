"""The evaluation runner, in one namespace: the grid (:mod:`~kvcake.eval.grid`), prompts
(:mod:`~kvcake.eval.prompts`), answering (:mod:`~kvcake.eval.answering`), the files of a run folder
(:mod:`~kvcake.eval.files`), the run record (:mod:`~kvcake.eval.record`), the summary
(:mod:`~kvcake.eval.summary`) and the run itself (:mod:`~kvcake.eval.run`)."""

from kvcake.eval.answering import MODES, answer_settings, feed, greedy
from kvcake.eval.files import (
    PREDICTIONS,
    RECORD,
    EvalDataWarning,
    Predictions,
    Shard,
    barrier,
    read_predictions,
    row_key,
    scan_predictions,
)
from kvcake.eval.grid import Setting, grid
from kvcake.eval.prompts import SPLIT, Encoded, encode
from kvcake.eval.record import RUN_KEYS, run_record
from kvcake.eval.run import EvalRun, evaluate
from kvcake.eval.summary import merge, summarise, write_metrics

__all__ = [
    "MODES", "PREDICTIONS", "RECORD", "RUN_KEYS", "SPLIT", "Encoded", "EvalDataWarning", "EvalRun", "Predictions",
    "Setting", "Shard", "answer_settings", "barrier", "encode", "evaluate", "feed", "grid", "greedy", "merge",
    "read_predictions", "row_key", "run_record", "scan_predictions", "summarise", "write_metrics",
]
