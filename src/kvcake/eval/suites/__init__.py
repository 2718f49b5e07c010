"""The benchmark suites: LongBench (v1) from its official data, and NeedleBench- and RULER-style tasks generated
over the offline haystack (:mod:`kvcake.eval.haystack`). Each suite module lists its metrics in ``METRICS``."""
