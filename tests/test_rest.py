"""Tests for rest.py (method §9): hand-made reward tables, a brute-force python reference of the
selection rule on random tied rewards, and the statistics against hand-computed values.
Run: python -m pytest -q tests/test_rest.py
"""
import math
import random

import pytest
import torch

from grpo import group_advantages
from rest import hard_prompts, pass_at, rest_stats, select


def reference_select(r, m):
    """Plain python: rank by (reward desc, index asc); keep the first m//2 and the last m - m//2."""
    order = sorted(range(len(r)), key=lambda i: (-r[i], i))
    return order if len(r) <= m else order[:m // 2] + order[len(r) - (m - m // 2):]


@pytest.mark.parametrize('rewards, m, expected', [
    ([[2.0] * 8], 4, [0, 1, 6, 7]),                      # all equal: still 4 distinct rollouts
    ([[1.0, 3.0, 2.0, 0.0]], 4, [1, 2, 0, 3]),            # N = m: everything, best first
    ([[0.5, 2.0, 1.0]], 4, [1, 2, 0]),                    # N < m: all N, nothing repeated
    ([[5, 5, 5, 1, 1, 1, 0, 0]], 4, [0, 1, 6, 7]),        # tie at the top boundary: lower index 1st
    ([[3, 1, 1, 1, 1, 0]], 4, [0, 1, 4, 5]),              # ties straddle both halves
    ([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]], 3, [[4, 1, 0], [0, 3, 4]]),  # odd m: 1 top + 2 bottom
])
def test_select_hand_tables(rewards, m, expected):
    got = select(torch.tensor(rewards, dtype=torch.float32), m)
    exp = torch.tensor(expected).reshape(len(rewards), -1)
    assert got.dtype == torch.long and torch.equal(got, exp)


def test_select_matches_bruteforce_on_random_ties():
    rng = random.Random(0)
    for _ in range(300):
        b, n, m = rng.randint(1, 4), rng.randint(1, 40), rng.randint(1, 20)
        r = [[float(rng.randint(0, 4)) for _ in range(n)] for _ in range(b)]  # many ties
        got = select(torch.tensor(r), m)
        assert got.shape == (b, min(n, m))
        for row, rr in zip(got.tolist(), r):
            assert row == reference_select(rr, m)
            assert len(set(row)) == len(row)


def test_bimodal_selection_gives_unit_advantages():
    # 64 rollouts, 24 successes (10) and 40 failures (0), shuffled: REST keeps 8 of each, so the
    # advantages are +-5/std with std = sqrt(16*25/15) (unbiased), whatever the order.
    r = torch.cat([torch.full((1, 40), 0.0), torch.full((1, 24), 10.0)], 1)[:, torch.randperm(64)]
    idx = select(r, 16)
    adv = group_advantages(r.gather(1, idx))
    expected = 5 / math.sqrt(16 * 25 / 15)  # = sqrt(15/16) ~ 0.968
    assert torch.allclose(adv[0, :8], torch.full((8,), expected), atol=1e-5)
    assert torch.allclose(adv[0, 8:], torch.full((8,), -expected), atol=1e-5)


def test_rest_stats_hand_computed():
    rewards = torch.tensor([[0., 0., 0., 0., 9., 3.],  # success only beyond the first m = 4
                            [1., 1., 1., 1., 1., 1.]])  # all tie: a flat group
    success = rewards >= 9
    idx = select(rewards, 4)  # row 0: [4, 5, 2, 3]; row 1: [0, 1, 4, 5]
    s = rest_stats(rewards, idx, 4, success)
    assert s['rest_any_success_all'] == 0.5
    assert s['rest_any_success_first_m'] == 0.0
    assert s['rest_flat_groups'] == 0.5
    assert s['rest_rescued'] == 0.5  # row 0: its one success is sample 5, beyond the first m = 4
    assert s['rest_reward_gap'] == pytest.approx(((9 + 3) / 2 - 0 + 0) / 2)
    # row 0 kept [9, 3, 0, 0]: mean 3, unbiased std sqrt((36 + 0 + 9 + 9) / 3) = sqrt(18); row 1: 0
    std = math.sqrt(18)
    assert s['rest_abs_adv'] == pytest.approx((6 + 0 + 3 + 3) / (std + 1e-6) / 8, rel=1e-5)
    assert all(isinstance(v, float) for v in s.values())


def test_rest_stats_small_groups():
    r = torch.tensor([[2.0]])  # N = 1: one kept rollout, no halves, no advantage
    s = rest_stats(r, select(r, 16), 16, r > 1)
    assert s['rest_reward_gap'] == 0.0 and s['rest_abs_adv'] == 0.0
    assert s['rest_any_success_all'] == 1.0


def test_rescued_matches_a_loop_per_prompt():
    """A prompt is rescued when its first success comes after sample m (brute force over random tables)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        n, m = int(torch.randint(1, 17, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        success = torch.rand(6, n, generator=g) < 0.15
        rewards = success.float() + torch.rand(6, n, generator=g)
        first = [next((k for k in range(n) if success[b, k]), None) for b in range(6)]
        expected = sum(f is not None and f >= m for f in first) / 6
        assert rest_stats(rewards, select(rewards, m), m, success)['rest_rescued'] == pytest.approx(expected)


def test_hard_prompts_and_pass_at_against_a_loop():
    """The --hard-below rule: success rate strictly below the threshold, boundaries included."""
    g = torch.Generator().manual_seed(0)
    success = torch.rand(40, 8, generator=g) < 0.3
    success[0], success[1] = False, True
    success[2] = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # rate exactly 1/8
    for below in (1 / 8, 0.25, 0.5, 1.0, 1e-9):
        expected = [i for i in range(40) if sum(map(bool, success[i])) / 8 < below]
        assert hard_prompts(success, below).tolist() == expected
    assert 2 not in hard_prompts(success, 1 / 8).tolist() and 0 in hard_prompts(success, 1 / 8).tolist()
    for k in (1, 4, 8):
        assert pass_at(success, k) == pytest.approx(sum(any(map(bool, success[i, :k])) for i in range(40)) / 40)
    assert pass_at(torch.tensor([[0, 0, 1], [0, 0, 0]]), 2) == 0.0 and pass_at(torch.zeros(0, 8), 8) == 0.0
