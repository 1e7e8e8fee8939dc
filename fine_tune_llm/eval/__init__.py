"""Evaluation: scoring answers, base vs tuned on the held-out split, the report."""
