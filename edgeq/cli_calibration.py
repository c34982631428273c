"""`edgeq calibrate` and `edgeq calibration ...` (calibration issue)."""
