"""edgeq: a PyTorch model to a verified INT8 edge model, as a Prefect DAG of cached, gated tasks."""

__version__ = "0.1.0"

# Part of every cache key: bump when a stage's output for the same inputs changes.
PIPELINE_VERSION = "5"
