"""Calibrating CAKE's temperatures tau1, tau2 for a model (``kvcake calibrate``).

CAKE's layer preference is P = H^(1/tau1) * V^(1/tau2) (Qin et al., ICLR 2025, eq. 4); the authors tuned tau per
model at 128 and 1024 tokens per layer and published values between 0.4 and 2.3 (:data:`kvcake.TAU_PRESETS`). This
module searches (tau1, tau2) over a small grid for another model, per budget (and per ratio), on calibration prompts
the harness generates (:mod:`kvcake.eval.suites`) from a seed no evaluation can use: ``calibration-<seed>``, a string,
where ``kvcake eval --seed`` takes integers, so a calibration prompt is never an evaluation prompt.

Each prompt is prefilled once and every (tau1, tau2) is replayed from that record
(:mod:`kvcake.engines.transformers.replay`, exact). A setting is scored by

* the task metric: the greedy answer under CAKE at that setting, scored as ``kvcake eval`` scores it (the mean over
  the calibration samples);
* a proxy, cheaper and finer than a metric over a few samples: the KL divergence of the compressed model's
  next-token distributions from the full cache's, teacher-forced on the first ``k`` tokens of the full cache's
  greedy answer (fed in one chunk after the prefill; the first token's distribution is the prefill's, the same for
  every method, and is left out).

The proxy is only used once it is shown to rank the settings as the metric does: for every budget the Spearman rank
correlation between the metric and the negated KL over the settings searched is written to ``tau.json``, and the
choice is made by the KL only when every correlation reaches ``threshold`` (0.8); otherwise by the metric (ties
broken by the KL), and the file says so (``score``, ``why``).
"""

from kvcake.calibrate import options
from kvcake.calibrate.choice import Point, choose, spearman
from kvcake.calibrate.search import calibrate

DEFAULT_GRID, DEFAULT_TASKS, THRESHOLD = options.DEFAULT_GRID, options.DEFAULT_TASKS, options.THRESHOLD
CalibrationError, calibration_seed = options.CalibrationError, options.calibration_seed
check_arguments, check_grid = options.check_arguments, options.check_grid

__all__ = ["DEFAULT_GRID", "DEFAULT_TASKS", "THRESHOLD", "CalibrationError", "Point", "calibrate", "calibration_seed",
           "check_arguments", "check_grid", "choose", "spearman"]
