"""The evaluation harness: benchmark suites (LongBench, NeedleBench-style, RULER-style), their metrics, a runner
over a grid of models × methods × budgets, and reports."""
