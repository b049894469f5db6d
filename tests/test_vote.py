"""Tests for vote.py (method §10): hand-built voting cases, and a straightforward numpy reference
(IoU of each candidate against each cluster's first member, in python loops) that must give the
identical mask on many random sample sets. bench/speed.py may import reference_vote / random_samples.
Run: python -m pytest -q tests/test_vote.py
"""
import json, random
from collections import Counter

import numpy as np
import pytest
import torch

import vote
from vote import majority_vote, pairwise_iou


def np_iou(a, b):  # exact, no epsilon (method §10.4); two empty masks: 0
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


def reference_vote(samples, no_object_thresh=0.5, cluster_iou=0.85, vote_ratio=0.2,
                   agg='best', pixel_thresh=0.5, shape=None):
    """The method §10 rule written the plain way. Returns (mask or None, [(members, votes, kept)])."""
    objs = [(i, j, np.asarray(m, bool), s) for i, smp in enumerate(samples) if smp
            for j, (m, s, _) in enumerate(smp)]
    shape = objs[0][2].shape if objs else shape
    empty = None if shape is None else np.zeros(shape, bool)
    valid = [s for s in samples if s is not None]
    if not valid or sum(len(s) == 0 for s in valid) / len(valid) >= no_object_thresh:
        return empty, []
    k_hat = Counter(len(s) for s in valid if s).most_common(1)[0][0]  # ties: first encountered
    clusters = []
    for o in objs:
        for c in clusters:
            if np_iou(c[0][2], o[2]) >= cluster_iou:
                c.append(o)
                break
        else:
            clusters.append([o])
    votes = [len({o[0] for o in c}) for c in clusters]
    means = [np.mean([o[3] for o in c]) for c in clusters]
    alive = [k for k in range(len(clusters)) if votes[k] / len(valid) >= vote_ratio]
    alive = alive or list(range(len(clusters)))
    top = sorted(alive, key=lambda k: (-votes[k], -means[k]))[:k_hat]
    out = empty.copy()
    for k in top:
        c = clusters[k]
        if agg == 'best':
            out |= sorted(c, key=lambda o: (-o[3], -o[2].sum()))[0][2]
        else:
            w = np.array([o[3] for o in c]) if any(o[3] > 0 for o in c) else np.ones(len(c))
            with np.errstate(all='ignore'):  # scores summing to 0: NaN weights, no pixel
                w = w / w.sum()
            out |= np.tensordot(w, np.array([o[2] for o in c], float), 1) >= pixel_thresh
    return out, [([o[:2] for o in c], votes[k], k in top) for k, c in enumerate(clusters)]


def rect(h, w, y0, x0, y1, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def random_samples(rng, n, h, w, max_objs=3):
    """n samples around a few random base objects (rectangles / ellipses), jittered by a pixel or
    two so that cluster IoUs fall on both sides of 0.85, with spurious objects, [] and None."""
    yy, xx = np.mgrid[:h, :w]
    def shape_mask(y, x, ry, rx, ellipse):
        if ellipse:
            return ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
        return (abs(yy - y) <= ry) & (abs(xx - x) <= rx)
    bases = [(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h / 3), rng.uniform(2, w / 3),
              rng.random() < 0.5) for _ in range(rng.randint(1, 4))]
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.12:
            out.append(None)
        elif u < 0.3:
            out.append([])
        else:
            objs = []
            for _ in range(rng.randint(1, max_objs)):
                y, x, ry, rx, e = rng.choice(bases) if rng.random() < 0.8 else \
                    (rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 6), rng.uniform(1, 6), 0)
                j = lambda: rng.choice([0, 0, 0, 1, -1, 2])
                m = shape_mask(y + j(), x + j(), ry + j() / 2, rx + j() / 2, e)
                objs.append((torch.from_numpy(m) if rng.random() < 0.5 else m,
                             rng.choice([rng.random(), round(rng.random() * 4) / 4]),
                             rng.choice(['cup', 'mug'])))
            out.append(objs)
    return out


def test_pairwise_iou_matches_numpy_loop(monkeypatch):
    g = torch.Generator().manual_seed(0)
    masks = list(torch.rand(7, 13, 11, generator=g) > torch.rand(7, 1, 1, generator=g))
    masks += [torch.zeros(13, 11, dtype=torch.bool), masks[2].clone()]  # empty; duplicate
    ref = np.array([[np_iou(a.numpy(), b.numpy()) for b in masks] for a in masks])
    for chunk in (vote.CPU_CHUNK, 5):  # one block, and ragged multi-block accumulation
        monkeypatch.setattr(vote, 'CPU_CHUNK', chunk)
        iou, area = pairwise_iou(masks)
        assert iou.dtype == torch.float64 and np.array_equal(iou.numpy(), ref)
        assert area.tolist() == [int(m.sum()) for m in masks]


def test_pairwise_iou_skips_empty_blocks_exactly(monkeypatch):
    """Compact masks touch few pixel blocks: the block-sparse Gram must still equal the loop, for
    8-pixel-word scans (H*W % 8 == 0) and byte scans, with ragged last blocks."""
    g = torch.Generator().manual_seed(1)
    for h, w in ((32, 24), (31, 23)):
        masks = []
        for _ in range(9):
            y, x = torch.randint(0, h - 6, (2,), generator=g).tolist()
            masks.append(rect(h, w, y, x % (w - 6), y + 6, x % (w - 6) + 5))
        masks += [masks[0] | masks[1], rect(h, w, h - 3, w - 4, h, w), torch.zeros(h, w, dtype=torch.bool)]
        ref = np.array([[np_iou(a.numpy(), b.numpy()) for b in masks] for a in masks])
        for chunk in (64, 40, 1 << 16):
            monkeypatch.setattr(vote, 'CPU_CHUNK', chunk)
            assert np.array_equal(pairwise_iou(masks)[0].numpy(), ref), (h, w, chunk)


H, W = 16, 40
A, B, C, D = rect(H, W, 0, 0, 8, 8), rect(H, W, 0, 20, 8, 28), rect(H, W, 10, 0, 16, 6), \
    rect(H, W, 10, 30, 16, 38)


def test_no_object_majority_and_abstentions():
    o = [(A, 0.9, 'a')]
    mask, clusters, reason = majority_vote([[], [], None, None, None, o])  # 2 of 3 valid say empty
    assert not mask.any() and mask.shape == (H, W) and clusters == [] and 'no-object' in reason
    assert not majority_vote([[], o, o, []])[0].any()  # exactly half: >= 0.5 is empty
    # unparsable samples abstain: 1 of 3 valid says empty, so the object wins (None is not a vote)
    mask, clusters, _ = majority_vote([None, None, None, o, o, []])
    assert torch.equal(mask, A) and clusters[0]['votes'] == 2
    assert majority_vote([None, None])[0] is None  # nothing to take a shape from
    assert majority_vote([None, []], shape=(3, 4))[0].shape == (3, 4)


def test_spurious_masks_dropped_by_vote_ratio():
    s = [[(A, .8, 'a'), (B, .9, 'b')], [(A, .8, 'a'), (B, .9, 'b')], [(A, .8, 'a'), (C, .99, 'c')],
         [(A, .8, 'a'), (B, .9, 'b')], [(A, .8, 'a'), (D, .99, 'd')], []]
    mask, clusters, reason = majority_vote(s)  # K̂ = 2; C and D have 1/6 < 0.2 of the votes
    assert torch.equal(mask, A | B) and '2 below' in reason
    assert [(c['votes'], c['kept'], c['label']) for c in clusters] == \
        [(5, True, 'a'), (3, True, 'b'), (1, False, 'c'), (1, False, 'd')]
    # K̂ = 2 but only A survives the ratio: the output has one object, not A + a spurious one
    s = [[(A, .8, 'a'), (m, .99, 'x')] for m in (B, C, D, B | C, C | D, B | D)]
    assert torch.equal(majority_vote(s)[0], A)
    assert torch.equal(majority_vote(s, vote_ratio=0.0)[0], A | B)  # without it: first 1-vote one


def test_all_clusters_below_ratio_keeps_all():
    singles = [A, B, C, D, A | D, B | C]
    s = [[(m, sc, 'x')] for m, sc in zip(singles, [.5, .6, .95, .7, .8, .9])]
    mask, clusters, reason = majority_vote(s)  # each has 1/6 < 0.2 of the votes: keep all, by score
    assert torch.equal(mask, C) and 'all below' in reason and sum(c['kept'] for c in clusters) == 1


def test_best_vs_consensus():
    m1, m2, m3 = rect(4, 40, 0, 0, 4, 20), rect(4, 40, 0, 0, 4, 22), rect(4, 40, 0, 1, 4, 21)
    s = [[(m1, .9, 'a')], [(m2, .8, 'a')], [(m3, .7, 'a')]]
    assert torch.equal(majority_vote(s)[0], m1)
    # by hand: col 0 has .9+.8 of 2.4, cols 1-19 all, col 20 .8+.7, col 21 only .8/2.4 < 0.5
    assert torch.equal(majority_vote(s, agg='consensus')[0], rect(4, 40, 0, 0, 4, 21))
    s[1] = [(m2, .9, 'a')]  # equal best scores: the larger mask wins
    assert torch.equal(majority_vote(s)[0], m2)


def test_votes_count_distinct_samples():
    a2 = A.clone()
    a2[0, 0] = False  # same object twice in one sample: one cluster, one vote
    s = [[(A, .95, 'a'), (a2, .95, 'a')], [(B, .6, 'b')], [(B, .6, 'b')]]
    mask, clusters, _ = majority_vote(s)  # K̂ = 1; members 2 vs 2, but votes 1 vs 2
    assert torch.equal(mask, B) and [c['votes'] for c in clusters] == [1, 2]
    assert clusters[0]['members'] == [(0, 0), (0, 1)]


def test_k_hat_ties_go_to_first_seen_count():
    one, two = [(A, .9, 'a')], [(A, .9, 'a'), (B, .9, 'b')]
    assert torch.equal(majority_vote([one, two, two, one])[0], A)
    assert torch.equal(majority_vote([two, one, one, two])[0], A | B)


def test_greedy_clustering_compares_first_member_only():
    m0, m1, m2 = rect(1, 100, 0, 0, 1, 50), rect(1, 100, 0, 0, 1, 56), rect(1, 100, 0, 0, 1, 63)
    # IoU(m0, m1) = .89, IoU(m1, m2) = .89, IoU(m0, m2) = .79: m2 opens its own cluster
    _, clusters, _ = majority_vote([[(m0, .9, 'a')], [(m1, .9, 'a')], [(m2, .9, 'a')]])
    assert [c['members'] for c in clusters] == [[(0, 0), (1, 0)], [(2, 0)]]
    # IoU 17/20 = 0.85 exactly (no epsilon): joins; 16/19 = 0.842 does not
    s = [[(rect(1, 100, 0, 0, 1, 17), .9, 'a')], [(rect(1, 100, 0, 0, 1, 20), .9, 'a')]]
    assert [c['members'] for c in majority_vote(s)[1]] == [[(0, 0), (1, 0)]]
    s = [[(rect(1, 100, 0, 0, 1, 16), .9, 'a')], [(rect(1, 100, 0, 0, 1, 19), .9, 'a')]]
    assert len(majority_vote(s)[1]) == 2
    # two empty masks never cluster together (IoU 0, not NaN)
    e = torch.zeros(1, 100, dtype=torch.bool)
    assert len(majority_vote([[(e, .9, 'a')], [(e, .9, 'a')]], vote_ratio=0)[1]) == 2


@pytest.mark.parametrize('agg', ['best', 'consensus'])
def test_matches_loop_reference_on_random_sets(agg):
    rng = random.Random(1 if agg == 'best' else 2)
    for _ in range(150):
        s = random_samples(rng, rng.randint(1, 12), rng.randint(8, 24), rng.randint(8, 24))
        kw = dict(agg=agg, cluster_iou=rng.choice([0.85, 0.5]), shape=(5, 5),
                  vote_ratio=rng.choice([0.2, 0.4]))
        mask, clusters, _ = majority_vote(s, **kw)
        ref, ref_clusters = reference_vote(s, **kw)
        assert np.array_equal(mask.numpy(), ref)
        assert [(c['members'], c['votes'], c['kept']) for c in clusters] == ref_clusters


def test_consensus_weights_equal_only_when_every_score_is_nonpositive():
    m1, m2, m3 = rect(1, 40, 0, 0, 1, 21), rect(1, 40, 0, 1, 1, 22), rect(1, 40, 0, 1, 1, 21)
    # IoU(m1, m2) = 20/22, one cluster. Scores .2 and -.3 sum to -.1 but one is > 0: the weights stay
    # the scores, normalised to -2 and 3: col 0 (m1 only) -2, cols 1-20 (both) 1, col 21 (m2 only) 3
    # -> cols 1-21. (Equal weights would give .5 at cols 0 and 21: cols 0-21.)
    mask = majority_vote([[(m1, .2, 'a')], [(m2, -.3, 'a')]], agg='consensus')[0]
    assert torch.equal(mask, m2)
    # every score <= 0: equal weights, 1/3 at cols 0 and 21, 3/3 at cols 1-20 -> m3
    # (the scores as weights, .714 at col 21, would add col 21)
    s = [[(m1, 0., 'a')], [(m2, -.5, 'a')], [(m3, -.2, 'a')]]
    assert torch.equal(majority_vote(s, agg='consensus')[0], m3)
    # scores summing to exactly 0 with one > 0: the reference's weights are NaN, no pixel is selected
    assert not majority_vote([[(m1, .5, 'a')], [(m2, -.5, 'a')]], agg='consensus')[0].any()


def votes_from_texts(texts, sample, size):
    """Texts -> majority_vote samples, the way eval.score_query builds them (method §10.1)."""
    import pipeline, segment
    answers = pipeline.segment_answers(segment.ColorSegmenter(), sample, texts, size, 'pixel')
    return [None if o is None else [(m, s, x['label'] or '') for x, m, s in zip(o, ms, ss)]
            for o, ms, ss in answers]


def blank_sample(h=100, w=100):
    import data
    return data.Sample(id='v', image=np.zeros((h, w, 3), np.uint8), query='q', masks=np.zeros((0, h, w), bool))


def test_items_without_box_or_point_vote_no_object():
    obj = '{"label": "a", "bbox_2d": [10, 10, 29, 29], "point_2d": [20, 20]}'
    texts = ['<answer>[{}]</answer>', '<answer>{}</answer>', f'<answer>[{obj}]</answer>']
    votes = votes_from_texts(texts, blank_sample(), 100)
    assert votes[:2] == [[], []] and len(votes[2]) == 1
    mask, clusters, reason = majority_vote(votes)  # 2 of 3 valid samples say "no object"
    assert not mask.any() and clusters == [] and reason == 'no-object majority (2/3 valid samples)'
    # a {} beside a real object is no object of its own: one object, K = 1
    votes = votes_from_texts([f'<answer>[{obj}, {{}}]</answer>'] * 2, blank_sample(), 100)
    assert [len(v) for v in votes] == [1, 1] and majority_vote(votes)[0].sum() == 400


def test_vote_uses_the_first_120_objects():
    # 125 distinct 4x4 squares on a blank image (the colour segmenter returns each whole box)
    squares = [{'label': 's', 'bbox_2d': [k % 12 * 8, k // 12 * 8, k % 12 * 8 + 3, k // 12 * 8 + 3],
                'point_2d': [k % 12 * 8 + 1, k // 12 * 8 + 1]} for k in range(125)]
    text = f'<answer>{json.dumps(squares)}</answer>'
    votes = votes_from_texts([text, text], blank_sample(), 100)
    assert [len(v) for v in votes] == [120, 120]
    mask, clusters, reason = majority_vote(votes)  # K = 120 clusters of 2 votes: 120 * 16 pixels
    assert mask.sum() == 1920 and len(clusters) == 120 and all(c['kept'] for c in clusters)
    assert not mask[80:84, 32:36].any()  # square 124 is past the cap
