"""Timing of the benchmark: the prefill and greedy decoding loops, the round schedule, and compiled decoding."""
