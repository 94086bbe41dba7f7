"""Specifications of tensorcurv.study.pareto.pareto_front on hand-made points."""

import math
import random

import pytest

from tensorcurv.study.pareto import pareto_front
from tensorcurv.study.tables import cosine_front


def test_front_keeps_exactly_the_non_dominated_points_sorted_by_cost():
    costs = [10, 1, 5, 3, 8, 2]
    errors = [0.1, 0.9, 0.2, 0.5, 0.3, 0.95]
    # (2, 0.95) is dominated by (1, 0.9); (8, 0.3) by (5, 0.2)
    assert pareto_front(costs, errors) == [1, 3, 2, 0]


def test_equal_cost_keeps_only_the_lower_error():
    assert pareto_front([1, 1, 2], [0.5, 0.4, 0.45]) == [1]


def test_exact_duplicates_keep_one_point():
    assert pareto_front([1, 1], [0.5, 0.5]) == [0]


def test_non_finite_points_are_never_on_the_front():
    assert pareto_front([1, math.nan, 3, math.inf], [math.nan, 0.0, 0.5, 0.1]) == [2]


def test_single_point_is_its_own_front():
    assert pareto_front([4.0], [0.2]) == [0]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="differ in length"):
        pareto_front([1, 2], [0.1])


def test_front_is_monotone_costs_increase_and_errors_strictly_decrease():
    gen = random.Random(0)
    costs, errors = [gen.random() for _ in range(200)], [gen.random() for _ in range(200)]
    front = pareto_front(costs, errors)
    assert all(costs[i] <= costs[j] and errors[i] > errors[j] for i, j in zip(front, front[1:]))


def test_cosine_front_is_monotone_cosine_increases_with_cost():
    gen = random.Random(1)
    rows = [{"step_time": gen.random(), "cos": gen.uniform(-1, 1)} for _ in range(200)]
    front = sorted(cosine_front(rows, "step_time"), key=lambda i: rows[i]["step_time"])
    assert all(rows[i]["cos"] < rows[j]["cos"] for i, j in zip(front, front[1:]))
