"""`edgeq check`: the compile-check matrix (backends issue)."""
