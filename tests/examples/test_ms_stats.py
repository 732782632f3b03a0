"""Paired statistics of the experiment (``stats.py``) against hand computation on tiny tables."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mslesion.evaluation import stats

# Student's t quantile t(0.975, 3), from a printed table (3.182), to more digits.
T_975_3 = 3.182446305284263
DIFFERENCES = [0.01, 0.03, -0.02, 0.04]


def test_t_interval_is_mean_plus_minus_t_quantile_times_standard_error() -> None:
    # mean 0.06 / 4 = 0.015; deviations -0.005, 0.015, -0.035, 0.025: squares sum to 2100e-6, variance 700e-6.
    mean, sd = 0.015, math.sqrt(2100e-6 / 3)
    half = T_975_3 * sd / math.sqrt(4)
    assert stats.t_interval(DIFFERENCES) == pytest.approx((mean - half, mean + half), abs=1e-12)
    comparison = stats.compare_paired({f"split-{k}": 0.5 + d for k, d in enumerate(DIFFERENCES)},
                                      {f"split-{k}": 0.5 for k in range(4)})
    assert comparison.mean == pytest.approx(mean) and comparison.t_interval == pytest.approx((mean - half, mean + half))
    assert stats.format_interval(comparison) == f"+1.50 [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"


def test_t_interval_of_one_value_is_undefined() -> None:
    assert all(math.isnan(v) for v in stats.t_interval([0.2]))


def test_wilcoxon_statistic_and_exact_p_by_hand() -> None:
    # |d| ranks: 0.01 -> 1, 0.02 -> 2, 0.03 -> 3, 0.04 -> 4; W+ = 1 + 3 + 4 = 8, W- = 2. Of the 16 sign
    # patterns, 3 give W- <= 2 ({}, {1}, {2}): two-sided p = 2 * 3/16.
    test = stats.wilcoxon_signed_rank(DIFFERENCES)
    assert (test.statistic, test.p, test.pairs, test.zeros, test.method) == (2.0, 0.375, 4, 0, "exact")
    # 4 pairs can never give p < 0.05: the smallest p is 2/2^4; the table says so instead of showing 0.375.
    assert not test.can_reach_05 and test.smallest_p == 0.125 and "cannot reach 0.05" in test.note
    assert stats.format_p(test) == "n/a: 4 pairs, p ≥ 0.125"


def test_six_differences_of_one_sign_reach_the_smallest_p() -> None:
    test = stats.wilcoxon_signed_rank([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert (test.statistic, test.p, test.note) == (0.0, 2 / 64, "") and test.can_reach_05
    assert stats.format_p(test) == "0.0312"


def test_zero_differences_are_dropped_and_counted() -> None:
    # Without the 0: ranks 1..6, W- = 6 (the -0.06). Subsets of {1..6} with sum <= 6: 14 -> p = 2 * 14/64.
    test = stats.wilcoxon_signed_rank([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, -0.06])
    assert (test.pairs, test.zeros, test.statistic) == (6, 1, 6.0)
    assert test.p == pytest.approx(28 / 64)
    assert stats.format_p(test) == "0.438 (1 zero)"


def test_all_zero_differences_have_no_test() -> None:
    test = stats.wilcoxon_signed_rank([0.0, 0.0, 0.0])
    assert test.p is None and test.statistic is None and test.zeros == 3
    assert stats.format_p(test) == "n/a: all differences 0"


def _all_sign_flips_p(differences: list[float]) -> float:
    """Two-sided p of W- over all 2^n sign flips of the midranks (the exact test with ties)."""
    absolute = np.abs(differences)
    ranks = np.array([np.mean([1 + j for j, b in enumerate(sorted(absolute)) if b == a]) for a in absolute])
    observed = ranks[np.asarray(differences) < 0].sum()
    observed = min(observed, ranks.sum() - observed)
    lows = [ranks[list(signs)].sum() for signs in itertools.product([False, True], repeat=len(ranks))]
    return min(1.0, 2 * np.mean(np.array(lows) <= observed + 1e-9))


def test_tied_differences_use_every_sign_flip() -> None:
    # Ranks 1.5, 1.5, 3, 4, 5, 6; W- = 1.5. W- <= 1.5 in 3 of 64 flips (none negative, either tie) -> p = 6/64.
    differences = [0.01, -0.01, 0.02, 0.03, 0.04, 0.05]
    test = stats.wilcoxon_signed_rank(differences)
    assert test.statistic == 1.5 and test.p == pytest.approx(6 / 64) == _all_sign_flips_p(differences)
    assert test.method.startswith("exact (") and stats.format_p(test) == "0.0938 (ties)"


def test_float_noise_is_not_a_difference() -> None:
    # 0.3 - 0.2 and 0.1 differ in the last bit: one tied value, not two ranks.
    test = stats.wilcoxon_signed_rank([0.3 - 0.2, 0.1, 0.2, 0.3, 0.4, -0.5])
    assert test.method.startswith("exact (")


def test_bootstrap_percentiles_by_hand_and_seeded() -> None:
    # Means of two draws from {0, 1}: 0 (1/4), 0.5 (1/2), 1 (1/4): the 2.5 % and 97.5 % quantiles are 0 and 1.
    assert stats.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    values = [0.01, 0.03, -0.02, 0.04, 0.02]
    assert stats.bootstrap_interval(values) == stats.bootstrap_interval(values)
    assert stats.bootstrap_interval(values, seed=1) != stats.bootstrap_interval(values)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=15))
def test_intervals_contain_the_mean_and_the_bootstrap_stays_in_the_data(values: list[float]) -> None:
    mean = float(np.mean(values))
    low, high = stats.t_interval(values)
    assert low <= mean + 1e-12 and mean - 1e-12 <= high
    low, high = stats.bootstrap_interval(values, resamples=500)
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12


def test_pairs_by_split_and_skips_unpaired_or_missing_scores() -> None:
    comparison = stats.compare_paired({"split-0": 0.6, "split-1": 0.7, "split-2": math.nan, "split-3": 0.9},
                                      {"split-0": 0.5, "split-1": 0.75, "split-2": 0.4})
    assert comparison.splits == ("split-0", "split-1") and comparison.n == 2
    assert comparison.differences == pytest.approx((0.1, -0.05))
    with pytest.raises(ValueError, match="no split has a score of both"):
        stats.compare_paired({"split-0": 0.6}, {"split-1": 0.5})


@pytest.mark.parametrize("bad", [[], [0.1, math.nan], [[0.1, 0.2]]])
def test_bad_differences_are_refused(bad: list) -> None:
    with pytest.raises(ValueError, match="differences must be"):
        stats.t_interval(bad)


def test_bad_confidence_is_refused() -> None:
    with pytest.raises(ValueError, match="confidence must be in"):
        stats.bootstrap_interval([0.1, 0.2], confidence=95)
