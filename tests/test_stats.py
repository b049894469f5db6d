"""Tests for stats.py (method §12): gIoU / cIoU against hand-computed values, the bootstrap against a
plain one-resample-at-a-time loop and against the normal approximation, the cIoU interval as a ratio
of sums, the groups and the results table, and the paired comparison (hand-computed differences and
standard errors, query matching, refusal of different query sets).
Run: .venv/bin/python -m pytest -q tests/test_stats.py
"""
import numpy as np
import pytest

import stats


def rec(inter, union, rtype=None, gt_empty=False, pred_empty=False, failed=0, lens=(10,), qid=None, query='q'):
    return dict(inter=inter, union=union, reasoning_type=rtype, gt_empty=gt_empty, pred_empty=pred_empty,
                failed=failed, resp_len=list(lens), id=qid, query=query)


def random_records(n, seed=0, types=('P/F', 'C/KI', 'C/R', 'C/MH', 'explicit')):
    rng = np.random.default_rng(seed)
    union = rng.integers(0, 400, n)
    inter = (union * rng.uniform(0, 1, n)).astype(int)
    return [rec(int(i), int(u), types[k % len(types)], qid=f'q{k}', query=f'query {k}')
            for k, (i, u) in enumerate(zip(inter, union))]


# ------------------------------------------------------------------ point values (method §12)
def test_ciou_sums_counts_giou_averages_ratios():
    st = stats.iou_stats([(1, 2), (9, 10), (0, 0)])  # IoU 0.5, 0.9, 1 (empty on empty)
    assert st['gIoU'] == pytest.approx((0.5 + 0.9 + 1.0) / 3)
    assert st['cIoU'] == pytest.approx(10 / 12)  # not the mean of ratios, not 1.0 for the empty one
    assert stats.iou_stats([(0, 0)]) == dict(n=1, gIoU=1.0, cIoU=1.0)


def test_summary_per_type_reasoning_no_object_failures_lengths():
    recs = [rec(1, 2, 'P/F', lens=(10, 20), failed=1), rec(3, 4, 'P/F', lens=(30, 40)),
            rec(0, 5, 'C/R', pred_empty=True, failed=2, lens=(5, 5)),
            rec(0, 0, 'C/R', gt_empty=True, pred_empty=True, lens=(1, 1)),
            rec(2, 2, 'explicit', lens=(1, 1)), rec(0, 6, None, gt_empty=True, lens=(2, 2))]
    s = stats.summarize(recs, resamples=200)
    assert s['n'] == 6 and s['gIoU'] == pytest.approx((0.5 + 0.75 + 0 + 1 + 1 + 0) / 6)
    assert s['cIoU'] == pytest.approx(6 / 19)
    assert list(s['per_type']) == ['P/F', 'C/R', 'explicit']  # ReasonSeg-X order, then the rest; None only in all
    assert s['reasoning']['n'] == 4 and s['reasoning']['gIoU'] == pytest.approx((0.5 + 0.75 + 0 + 1) / 4)
    assert s['reasoning']['cIoU'] == pytest.approx(4 / 11)
    pf = s['per_type']['P/F']
    assert (pf['n'], pf['gIoU'], pf['cIoU']) == (2, pytest.approx(0.625), pytest.approx(4 / 6))
    assert (s['no_object_acc'], s['n_no_object']) == (0.5, 2)
    assert s['format_fail'] == pytest.approx(3 / 12) and s['resp_len'] == pytest.approx(118 / 12)
    no_types = stats.summarize([rec(1, 2)], resamples=10)
    assert no_types['no_object_acc'] is None and no_types['reasoning'] is None and no_types['per_type'] == {}


# ------------------------------------------------------------------ the bootstrap
def test_bootstrap_equals_a_plain_loop_over_resamples():
    recs = random_records(37)
    pairs = stats.pairs_of(recs)
    got = stats.bootstrap(pairs, resamples=300, seed=5)
    inter, union = np.array(pairs, float).T
    rng, g, c = np.random.default_rng(5), [], []
    for _ in range(300):  # one resample at a time, scalar formulas
        idx = rng.integers(0, len(pairs), len(pairs))
        g.append(np.mean([inter[k] / union[k] if union[k] else 1.0 for k in idx]))
        c.append(inter[idx].sum() / union[idx].sum())
    assert got['gIoU_ci'] == pytest.approx(list(np.percentile(g, [2.5, 97.5])))
    assert got['cIoU_ci'] == pytest.approx(list(np.percentile(c, [2.5, 97.5])))
    assert stats.bootstrap(pairs, resamples=300, seed=5) == got             # seeded: same numbers
    assert stats.bootstrap(pairs, resamples=300, seed=6)['gIoU_ci'] != got['gIoU_ci']


def test_bootstrap_width_matches_the_normal_approximation():
    recs = random_records(2000, seed=1)
    st = stats.bootstrap(stats.pairs_of(recs), resamples=2000)
    iou = stats.iou_per_query(*np.array(stats.pairs_of(recs), float).T)
    half = 1.96 * iou.std(ddof=1) / np.sqrt(len(iou))
    lo, hi = st['gIoU_ci']
    assert lo < st['gIoU'] < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_ciou_interval_is_a_ratio_of_sums_not_a_mean_of_ratios():
    # 50 big queries at IoU 0.9, 50 tiny ones at IoU 0.1: cIoU ~0.9, mean of ratios 0.5
    pairs = [(900, 1000)] * 50 + [(1, 10)] * 50
    st = stats.bootstrap(pairs, resamples=500)
    lo, hi = st['cIoU_ci']
    assert lo <= st['cIoU'] <= hi and lo > 0.85
    assert stats.bootstrap([(0, 0)] * 5, resamples=50)['cIoU_ci'] == [1.0, 1.0]  # all empty on empty
    assert stats.bootstrap([], resamples=50)['gIoU_ci'] is None


def test_table_lists_every_group_with_intervals():
    s = stats.summarize(random_records(100), resamples=200)
    lines = stats.table(stats.rows(s)).splitlines()
    assert [ln.split()[0] for ln in lines] == ['type', 'all', 'reasoning', 'P/F', 'C/KI', 'C/R', 'C/MH', 'explicit']
    assert lines[2].startswith('reasoning') and lines[3].startswith('  P/F')
    assert f"{100 * s['gIoU']:.1f}  {stats.ci_text(s['gIoU_ci'])}" in lines[1]


# ------------------------------------------------------------------ paired comparison
def test_paired_difference_standard_error_and_counts_by_hand():
    a = [rec(1, 2, 'P/F', qid='x'), rec(3, 4, 'P/F', qid='y'), rec(0, 4, 'explicit', qid='z')]
    b = [rec(1, 4, 'explicit', qid='z'), rec(1, 4, 'P/F', qid='x'), rec(3, 4, 'P/F', qid='y')]  # other order
    d = stats.paired(a, b, resamples=200)
    diffs = np.array([0.5 - 0.25, 0.0, 0.0 - 0.25])  # x, y, z
    assert d['all']['n'] == 3 and d['all']['gIoU_diff'] == pytest.approx(diffs.mean())
    assert d['all']['gIoU_se'] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert d['all']['cIoU_diff'] == pytest.approx(4 / 10 - 5 / 12)
    assert (d['all']['better'], d['all']['worse']) == (1, 1)
    assert d['reasoning']['gIoU_diff'] == pytest.approx(0.125) and d['P/F']['n'] == 2
    assert d['explicit']['gIoU_a'] == 0.0 and d['explicit']['gIoU_b'] == 0.25
    assert stats.paired(a, a, resamples=50)['all']['gIoU_ci'] == [0.0, 0.0]


def test_paired_interval_is_tighter_than_the_two_separate_ones():
    a = random_records(400, seed=2)
    b = [dict(r, inter=max(0, r['inter'] - 1)) for r in a]  # the same queries, a little worse
    d = stats.paired(a, b, resamples=500)['all']
    lo, hi = d['gIoU_ci']
    assert 0 < lo < d['gIoU_diff'] < hi
    sa, sb = (stats.bootstrap(stats.pairs_of(x), resamples=500) for x in (a, b))
    assert hi - lo < 0.3 * (sa['gIoU_ci'][1] - sa['gIoU_ci'][0])  # pairing removes the between-query spread
    assert sa['gIoU_ci'][0] < sb['gIoU'] < sa['gIoU_ci'][1]          # unpaired, the two would overlap
    text = stats.compare_table(stats.paired(a, b, resamples=100), 'new', 'old')
    assert 'new minus old' in text and text.splitlines()[2].split()[0] == 'all'


def test_paired_refuses_different_queries():
    a = random_records(10)
    with pytest.raises(ValueError, match='different queries'):
        stats.paired(a, a[:9])
    with pytest.raises(ValueError, match='different queries'):
        stats.paired(a, a[:9] + [dict(a[9], id='other')])
    with pytest.raises(ValueError, match='another text'):
        stats.paired(a, a[:9] + [dict(a[9], query='changed')])
