"""Evaluation: bits per byte, task accuracy with chance levels and paired tests, the report."""
