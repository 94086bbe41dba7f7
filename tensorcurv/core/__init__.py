"""Capture, per-sample statistics, losses, layer adapters, and the exact curvature operator on the statistics."""
