"""Capture, per-sample statistics, losses and layer adapters."""
