"""Reproductions of the paper's experiments (SK stability, QK-only retrain)."""
