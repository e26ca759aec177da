"""MLflow tracking: the live stage run and its spill/replay, the pipeline parent run, run comparison."""
