"""Running a search: choosing the result on held-out calibration data, checkpoints and resume, and one
search spread over several processes."""
