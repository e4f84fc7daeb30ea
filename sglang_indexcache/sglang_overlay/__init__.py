"""Code the SGLang patch set calls: flags, validation, observability, calibration mode."""
