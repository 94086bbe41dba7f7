"""Approximation-accuracy studies: metrics against the exact block, Pareto fronts, reports."""
