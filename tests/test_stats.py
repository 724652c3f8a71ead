"""Each statistic of gendistill.evaluation.stats against a hand computation on constructed outcomes."""
import math

import numpy as np
import pytest

from gendistill.evaluation import stats


def test_mcnemar_exact_by_hand():
    # one discordant item: Binomial(1, 1/2), P(X <= 0) = 1/2, two-sided p = 1
    a, b = [1] * 31 + [0] * 29, [1] * 30 + [0] * 30
    assert stats.mcnemar_exact(a, b) == {"p": 1.0, "a_only": 1, "b_only": 0}
    # 8 against 1 discordant items: 2 (C(9,0) + C(9,1)) / 2^9 = 20 / 512
    a = [1] * 8 + [0] * 1 + [1] * 10
    b = [0] * 8 + [1] * 1 + [1] * 10
    assert stats.mcnemar_exact(a, b)["p"] == pytest.approx(20 / 512)
    assert stats.mcnemar_exact([1, 0], [1, 0])["p"] == 1.0  # no discordant item


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(1 x 0.04, 0.06) = 0.06; input order kept
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_wilson_and_bootstrap_agree():
    assert stats.wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook value
    low, high = stats.wilson(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    est = stats.mean_ci([1] * 60 + [0] * 40)
    w_low, w_high = stats.wilson(60, 100)
    assert est["value"] == 0.6 and abs(est["low"] - w_low) < 0.015 and abs(est["high"] - w_high) < 0.015
    assert stats.mean_ci([1] * 60 + [0] * 40) == est  # fixed seed: the same interval every time


def test_clusters_are_resampled_whole():
    values = np.array([1] * 30 + [0] * 20)
    single = stats.mean_ci(values)
    # every item twice: as one cluster per pair the interval is exactly the original one; as independent items
    # it is (wrongly) narrower
    doubled, labels = np.repeat(values, 2), np.repeat(np.arange(50), 2)
    assert stats.mean_ci(doubled, clusters=list(labels)) == single
    naive = stats.mean_ci(doubled)
    assert naive["high"] - naive["low"] < single["high"] - single["low"]


def test_chance_corrected_retention_by_hand():
    assert stats.chance_corrected(0.5, 1.0, 0.25) == pytest.approx(1 / 3)
    assert stats.chance_corrected(0.25, 0.9, 0.25) == 0.0  # a chance-level student retains nothing
    assert stats.chance_corrected(0.4, 0.25, 0.25) is None  # a teacher at chance has no skill to retain
    # the case: teacher 100 %, 4-way MC; a chance-level student that answers half the time
    assert stats.chance_corrected(0.25, 1.0, 0.25) == 0.0  # under LL (always picks an option)
    assert stats.chance_corrected(0.125, 1.0, 0.25) == pytest.approx(-1 / 6)  # under generation
    teacher = [1] * 40
    student = [1] * 25 + [0] * 15
    est = stats.retention_ci(student, teacher, chance=0.25)
    assert est["value"] == pytest.approx((25 / 40 - 0.25) / 0.75) and est["low"] < est["value"] < est["high"]
    raw = stats.retention_ci(student, teacher)
    assert raw["value"] == pytest.approx(25 / 40)
    zero = stats.retention_ci(student, [0] * 40)
    assert zero["value"] is None and "not above chance" in zero["why"]


def test_paired_difference_one_item_apart_is_not_significant():
    a = [1] * 31 + [0] * 29
    b = [1] * 30 + [0] * 30
    d = stats.paired_difference(a, b)
    assert d["value"] == pytest.approx(1 / 60) and d["test"] == "mcnemar_exact" and d["p"] == 1.0
    assert d["low"] <= 0 <= d["high"]
    # 20 items apart, all one way: McNemar p = 2 / 2^20
    far = stats.paired_difference([1] * 50 + [0] * 10, [1] * 30 + [0] * 30)
    assert far["p"] == pytest.approx(2 / 2 ** 20) and far["low"] > 0


def test_gap_difference_and_answer_stats():
    n = 40
    teacher_ll = teacher_gen = [1] * n
    student_ll = [1] * 36 + [0] * 4     # 10 points behind under LL
    student_gen = [1] * 16 + [0] * 24   # 60 points behind under generation
    d = stats.gap_difference(teacher_ll, student_ll, teacher_gen, student_gen)
    assert d["value"] == pytest.approx(0.5) and d["low"] > 0 and d["p"] < 0.01
    answered = [1] * 20 + [0] * 20
    correct = [1] * 15 + [0] * 25
    out = stats.answer_stats(answered, correct)
    assert out["answer_rate"]["value"] == 0.5 and out["acc_when_answered"]["value"] == 0.75
    assert out["acc_when_answered"]["n_answered"] == 20
    none = stats.answer_stats([0] * 5, [0] * 5)
    assert none["acc_when_answered"]["value"] is None


def test_kendall_tau_three_models_by_hand():
    # x orders A > B > C; y orders B > A > C: pairs AB discordant, AC and BC concordant -> (2 - 1) / 3
    assert stats.kendall_tau([0.9, 0.8, 0.5], [0.6, 0.7, 0.3]) == pytest.approx(1 / 3)
    # ties: 4 concordant, 1 discordant, 1 tied in x only -> (4 - 1) / sqrt((6 - 1) * 6)
    assert stats.kendall_tau([1, 2, 3, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(30))
    assert stats.kendall_tau([1, 1], [1, 2]) is None
    rng = np.random.default_rng(1)
    x = (rng.random((3, 80)) < np.array([[0.9], [0.6], [0.3]])).astype(float)
    y = (rng.random((3, 80)) < np.array([[0.8], [0.5], [0.2]])).astype(float)
    est = stats.kendall_tau_ci(x, y)
    assert est["value"] == stats.kendall_tau(x.mean(1), y.mean(1)) and est["low"] <= est["value"] <= est["high"]
    assert stats.kendall_tau_ci(x[:2], y[:2]) is None  # two models: tau is +-1 by construction


def test_bootstrap_p_and_seeds():
    assert stats.bootstrap_p(np.zeros(100)) == 1.0
    assert stats.bootstrap_p(np.ones(9999)) == pytest.approx(1 / 10000)
    assert stats.task_seed("a") == stats.task_seed("a") != stats.task_seed("b")


def test_resamples_do_not_depend_on_how_many_rows_are_drawn():
    """Paired by construction: one model's resampled means are the same whether drawn alone or with others."""
    rng = np.random.default_rng(3)
    rows = (rng.random((12, 700)) < 0.6).astype(float)
    together = stats.bootstrap_means(rows, iters=2000, seed=7)
    alone = stats.bootstrap_means(rows[:1], iters=2000, seed=7)
    assert np.array_equal(together[0], alone[0])
