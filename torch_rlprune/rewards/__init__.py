"""How plans are scored: the calibration inputs, the scores, and the two repairs a plan is scored after
(BatchNorm recalibration, least-squares refit)."""
