"""Stage 4, evaluation: metrics with intervals, calibration, and the self-contained HTML report."""
