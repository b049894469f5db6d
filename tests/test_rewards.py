"""Tests for rewards.py: hand-computed method §5 cases, Hungarian vs brute force, vectorised IoUs vs
loops, the linear tag check vs the regex, and score_group vs per-rollout scoring, in any chunking and
in bounded memory. The fuzz on model output is tests/test_fuzz.py.
Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_rewards.py
"""
import dataclasses, itertools, json, math, re, tracemalloc
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import data, model as M, rewards as R, segment

HW = 100


def rect(x1, y1, x2, y2):  # mask of the inclusive box: its area is the +1-pixel box area
    m = np.zeros((HW, HW), bool)
    m[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = True
    return m


A = dict(label='cup', bbox_2d=[10, 10, 29, 29], point_2d=[20, 20])   # 20x20 = 400 px
B = dict(label='dog', bbox_2d=[60, 50, 79, 89], point_2d=[70, 70])   # 20x40 = 800 px
C = dict(label='cat', bbox_2d=[40, 40, 49, 49], point_2d=[45, 45])   # far from A and B


def own_masks(objs):  # each prediction's mask = the rectangle of its own box
    return np.array([rect(*o['bbox_2d']) for o in objs], bool).reshape(-1, HW, HW)


def gt(*objs):
    return data.Sample(id='t', image=np.zeros((HW, HW, 3), np.uint8), query='q', masks=own_masks(objs),
                       boxes=np.array([o['bbox_2d'] for o in objs], float).reshape(-1, 4),
                       points=np.array([o['point_2d'] for o in objs], float).reshape(-1, 2),
                       labels=[o['label'] for o in objs])


def answer(objs, think='<think>look</think>', tail=''):
    return f'{think}<answer>{json.dumps(objs)}</answer>{tail}'


NOLABEL = {k: v for k, v in A.items() if k != 'label'}
HALF, SEVENTY = rect(10, 10, 19, 29)[None], rect(10, 10, 23, 29)[None]  # 200 / 280 px inside A
NONE = np.zeros((0, HW, HW), bool)
# (text, GT objects, predicted masks (None: each object's own box), stage, format, accuracy, correct)
# with the hand computation above each row; non_repeat is 1 throughout (no repeated '.'-sentence),
# so total = format + accuracy + 1. A matched exact pair scores 8: tier 5 (IoU = 400/(400+1e-6)
# > 0.9), box IoU 1 > 0.5, mean |Δbox| 0 < 10, point 0 px away and inside its own box.
CASES = {
    # format 1 + 2/3*3 = 3; stage 1: (8 + 8)/2 + 1 (M == N) = 9 -> total 13
    'perfect': (answer([A, B]), [A, B], None, 1, 3, 9, True),
    # stage 2: 2 * (5 + 5)/2 = 10 -> total 14
    'perfect-stage2': (answer([A, B]), [A, B], None, 2, 3, 10, True),
    # Hungarian pairs B->B, A->A: same as perfect -> 13
    'swapped': (answer([B, A]), [A, B], None, 1, 3, 9, True),
    # M=1, N=2: 8/2 + 0 = 4 -> 8; matched tier mean 5/2 = 2.5 >= 2 -> correct
    'one-of-two': (answer([A]), [A, B], None, 1, 3, 4, True),
    # stage 2: 2 * 5/2 = 5 -> 9
    'one-of-two-stage2': (answer([A]), [A, B], None, 2, 3, 5, True),
    # M=3, N=2: (8 + 8)/3 + 0 = 16/3 -> 4 + 16/3
    'one-extra': (answer([A, C, B]), [A, B], None, 1, 3, 16 / 3, True),
    # stage 2: 2 * 10/3 = 20/3 -> 4 + 20/3
    'one-extra-stage2': (answer([A, C, B]), [A, B], None, 2, 3, 20 / 3, True),
    # format: tags 1 + 0 (empty answer earns no field part); "no object" is right: 9 -> 11
    'empty-vs-empty': (answer([]), [], NONE, 1, 1, 9, True),
    # stage 2: 10 -> 12
    'empty-vs-empty-stage2': (answer([]), [], NONE, 2, 1, 10, True),
    # empty answer, two GT objects: accuracy 0 -> 2
    'empty-vs-two': (answer([]), [A, B], NONE, 1, 1, 0, False),
    # one object on an empty GT: accuracy 0 -> 4
    'one-vs-empty': (answer([A]), [], None, 2, 3, 0, False),
    # fields: A 2 of 3, B 3 of 3 -> 2/3 * (2 + 3)/2 = 5/3; format 8/3; accuracy 9 -> 8/3 + 10
    'missing-label': (answer([NOLABEL, B]), [A, B], own_masks([A, B]), 1, 8 / 3, 9, True),
    # tags 0 (no <think>), fields 2 -> format 2; 2 + 9 + 1 = 12
    'no-think': (answer([A, B], think=''), [A, B], None, 1, 2, 9, True),
    # fullmatch fails on text after </answer>: format 0 + 2 -> 12
    'text-after': (answer([A, B], tail=' done'), [A, B], None, 1, 2, 9, True),
    # surrounding whitespace alone is stripped: format 3 -> 13
    'whitespace-around': ('\n' + answer([A, B], tail='\n'), [A, B], None, 1, 3, 9, True),
    # point [32,20]: 12 px from the GT point (< 30) but x = 32 > 29, outside its own box -> 0;
    # pair 5 + 1 + 1 + 0 = 7; M = N = 1: 7 + 1 = 8 -> 12
    'point-outside-box': (answer([dict(A, point_2d=[32, 20])]), [A], own_masks([A]), 1, 3, 8, True),
    # IoU 200/400 = 0.5 (minus the 1e-6) -> tier 1 (≤ 0.5); pair 1 + 3, +1 -> 5 -> 9
    'iou-0.5-stage1': (answer([A]), [A], HALF, 1, 3, 5, False),
    # stage 2: 2 * 1 = 2 -> 6; tier 1 < 2 -> not correct
    'iou-0.5-stage2': (answer([A]), [A], HALF, 2, 3, 2, False),
    # IoU 280/400 = 0.7 -> tier 2 (≤ 0.7); 2 * 2 = 4 -> 8; tier 2 -> correct
    'iou-0.7-stage2': (answer([A]), [A], SEVENTY, 2, 3, 4, True),
    # box [10,10,29,49]: IoU 400/800 = 0.5, not > 0.5 -> 0; mean |Δ| 20/4 = 5 -> 1; point 1; tier 5:
    # pair 7, +1 -> 8 -> 12
    'box-iou-0.5': (answer([dict(A, bbox_2d=[10, 10, 29, 49])]), [A], own_masks([A]), 1, 3, 8, True),
    # box moved by (10,10): mean |Δ| = 10, not < 10 -> 0; IoU 100/700 -> 0; point [30,30] in its
    # box, 14.1 px away -> 1; pair 5 + 0 + 0 + 1 = 6, +1 -> 7 -> 11
    'box-l1-10': (answer([dict(A, bbox_2d=[20, 20, 39, 39], point_2d=[30, 30])]), [A], own_masks([A]),
                  1, 3, 7, True),
    # point [50,20] exactly 30 px away (not < 30), inside box [10,10,59,29]: IoU 400/1000 -> 0,
    # mean |Δ| 30/4 -> 1; pair 5 + 0 + 1 + 0 = 6, +1 -> 7 -> 11
    'point-30px': (answer([dict(A, bbox_2d=[10, 10, 59, 29], point_2d=[50, 20])]), [A], own_masks([A]),
                   1, 3, 7, True),
    # A, A again, C vs GT A: pair totals 8, 8, 0 (C: IoU 0, mean |Δ| 25, point 35 px away);
    # Hungarian takes one 8: 8/3 + 0 -> 4 + 8/3; matched tier mean 5/3 < 2 -> not correct
    'three-vs-one': (answer([A, A, C]), [A], None, 1, 3, 8 / 3, False),
    # stage 2: 2 * 5/3 = 10/3 -> 4 + 10/3
    'three-vs-one-stage2': (answer([A, A, C]), [A], None, 2, 3, 10 / 3, False),
    # unparsable answer: format 1 (tags) + 0, accuracy 0 -> 2
    'unparsable': ('<think>x</think><answer>not json</answer>', [A], NONE, 1, 1, 0, False),
    # an item without box or point is no object (method §2): a "no object" answer, accuracy 0 (was
    # 1: one empty-mask object, M == N); its label still earns format as the reference pays it:
    # 1 + 2/3 -> 5/3 + 1
    'label-only': (answer([{'label': 'cup'}]), [A], NONE, 1, 5 / 3, 0, False),
    # [{}] is a "no object" answer, right on an empty GT: format 1 + 0/1 items, accuracy 9 -> 11
    'empty-item-vs-empty': (answer([{}]), [], NONE, 1, 1, 9, True),
    # {} alone, stage 2, one GT object: no object, accuracy 0 -> 2
    'empty-dict-vs-one': (answer({}), [A], NONE, 2, 1, 0, False),
    # a {} among objects is no object but an item: fields 2/3 * (3 + 0 + 3)/3 = 4/3 -> format 7/3;
    # the objects are [A, B]: accuracy 9 -> 7/3 + 10
    'objects-and-empty-item': (answer([A, {}, B]), [A, B], None, 1, 7 / 3, 9, True),
    # junk items count as items that earn nothing: 2/3 * 3/3 -> format 5/3; objects [A] -> 9
    'object-and-junk': (answer([A, 7, 'x']), [A], None, 1, 5 / 3, 9, True),
    # the two repairs: '[20, 20}}]' and '[10, 10, 29, 29]"' parse as A does -> 13
    'repaired': (answer([A]).replace('20]}]', '20}}]').replace('29]', '29]"'), [A], None, 1, 3, 9, True),
    # 125 copies of A vs GT A, B: the first 120 count; one pair scores 8 (A-A), B's best is 0:
    # 8/120 + 0 = 1/15; matched tier mean 5/120 < 2; format 3 over all 125 items -> 4 + 1/15
    'cap-120': (answer([A] * 125), [A, B], None, 1, 3, 8 / 120, False),
    # stage 2: 2 * 5/120 = 1/12 -> 4 + 1/12
    'cap-120-stage2': (answer([A] * 125), [A, B], None, 2, 3, 10 / 120, False),
}


@pytest.mark.parametrize('name', CASES)
def test_hand_computed_cases(name):
    text, gt_objs, masks, stage, fmt, acc, correct = CASES[name]
    masks = own_masks(M.parse_answer(text)) if masks is None else masks
    assert 'repaired' not in name or text.count('}}]') == text.count(']"') == 1  # the typos are there
    total, c = R.reward(text, gt(*gt_objs), masks, stage)
    assert c['format'] == pytest.approx(fmt, abs=1e-12)
    assert c['accuracy'] == pytest.approx(acc, abs=1e-12)
    assert c['non_repeat'] == 1.0 and c['correct'] is correct
    assert total == pytest.approx(fmt + acc + 1, abs=1e-12)


def test_mask_tier_edges():
    edges = np.array([0.3, 0.30001, 0.5, 0.7, 0.8, 0.9, 0.90001])
    assert R.mask_tier(edges).tolist() == [0, 1, 1, 2, 3, 4, 5]
    assert R.mask_tier(0.3) == 0 and R.mask_tier(0.95) == 5 and R.mask_tier(float('nan')) == 0


def test_non_repeat():
    assert R.non_repeat_reward('a. b. a. c') == 1.0     # one repeat is tolerated
    assert R.non_repeat_reward('a. a. a') == 0.0        # two repeats of one sentence
    assert R.non_repeat_reward('a. b. a. b.') == 0.0    # one repeat each of two sentences
    assert R.non_repeat_reward('a.. a . . b') == 1.0    # empties dropped, spaces stripped
    assert R.non_repeat_reward('') == 1.0


# ----------------------------------------------------------------- matching and IoU references
def brute_best(score):
    m, n = score.shape
    if m > n:
        return brute_best(score.T)
    return max(sum(score[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(n), m))


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(150):
        m, n = rng.integers(1, 7, size=2)
        score = rng.integers(0, 9, size=(m, n))
        r, c = R.best_matching(score, 8)
        assert len(set(r)) == len(r) == len(set(c)) == min(m, n)
        assert score[r, c].sum() == brute_best(score)
        tiers = rng.integers(0, 6, size=(m, n))
        assert R.stage2_accuracy(tiers)[0] == pytest.approx(2 * brute_best(tiers) / max(m, n))


def loop_box_iou(p, q):
    iw = max(0, min(p[2], q[2]) - max(p[0], q[0]) + 1)
    ih = max(0, min(p[3], q[3]) - max(p[1], q[1]) + 1)
    return iw * ih / ((p[2] - p[0] + 1) * (p[3] - p[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - iw * ih)


def test_stage1_accuracy_equals_loop_and_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(100):
        m, n = rng.integers(1, 6, size=2)
        gb = rng.integers(0, 40, size=(n, 4))
        gb[:, 2:] = gb[:, :2] + rng.integers(25, 40, size=(n, 2))  # x1,y1,x2,y2 ordered
        pb = gb[rng.integers(0, n, m)] + rng.integers(-12, 13, size=(m, 4))
        gp, pp = rng.uniform(0, 60, (n, 2)), rng.uniform(0, 60, (m, 2))
        if m > 1:
            pp[0] = np.nan                                          # a missing point earns nothing
        tiers = rng.integers(0, 6, size=(m, n))
        ref = np.zeros((m, n))
        for i, j in itertools.product(range(m), range(n)):
            x1, y1, x2, y2 = pb[i]
            inside = x1 <= pp[i, 0] <= x2 and y1 <= pp[i, 1] <= y2
            ref[i, j] = (tiers[i, j] + (loop_box_iou(pb[i], gb[j]) > 0.5)
                         + (np.mean(np.abs(pb[i] - gb[j])) < 10) + (math.dist(pp[i], gp[j]) < 30 and inside))
        assert np.array_equal(R.stage1_pair_scores(tiers, pb, pp, gb, gp), ref)
        acc, _ = R.stage1_accuracy(tiers, pb, pp, gb, gp)
        assert acc == pytest.approx(brute_best(ref) / max(m, n) + (m == n))


def test_iou_matrices_equal_loops():
    rng = np.random.default_rng(2)
    a, b = rng.random((4, 9, 7)) < 0.4, rng.random((3, 9, 7)) < 0.6
    a[0] = False                                                      # empty mask: IoU 0
    ref = [[(x & y).sum() / ((x | y).sum() + 1e-6) for y in b] for x in a]
    assert np.allclose(R.mask_iou_matrix(a, b), ref, rtol=0, atol=1e-12)
    assert R.mask_iou_matrix(a[:0], b).shape == (0, 3)
    ba, bb = rng.uniform(0, 50, (5, 4)), rng.uniform(0, 50, (3, 4))
    ba[:, 2:] += ba[:, :2]
    bb[:, 2:] += bb[:, :2]
    ref = [[loop_box_iou(p, q) for q in bb] for p in ba]
    assert np.allclose(R.box_iou_matrix(ba, bb), ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------- the tag pattern, in linear time
_TOKENS = ['<think>', '</think>', '<answer>', '</answer>', ' ', '\n', '\x1c', '\xa0', '\u2003', 'a', '<', '>']


@settings(max_examples=1500, derandomize=True, database=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map(''.join))
def test_tags_match_equals_the_regex(text):
    """The linear scan says exactly what re.fullmatch of method §5's pattern says."""
    assert R._tags_match(text) == bool(re.fullmatch(r'<think>.*?</think>\s*<answer>.*?</answer>', text, re.S))


# ----------------------------------------------------------------- score_group: one batched call
def test_score_group_equals_per_rollout_reward(monkeypatch):
    img = np.zeros((HW, HW, 3), np.uint8)
    img[10:30, 10:30], img[50:90, 60:80] = (255, 0, 0), (0, 255, 0)       # A red, B green
    sample = dataclasses.replace(gt(A, B), image=img)
    half = lambda o: {**o, 'bbox_2d': [v / 2 for v in o['bbox_2d']], 'point_2d': [v / 2 for v in o['point_2d']]}
    texts = [answer([half(A), half(B)]), answer([half(B)]), answer([]), 'garbage',
             answer([{'label': 'x'}, half(C)]), answer([dict(half(A), bbox_2d=None)], tail='. a. a. a')]
    calls, real = [], segment.segment
    monkeypatch.setattr(segment, 'segment', lambda *a, **kw: calls.append(1) or real(*a, **kw))
    seg = segment.ColorSegmenter()
    for stage in (1, 2):
        got = R.score_group(texts, sample, seg, stage, input_wh=(50, 50), key='img0')
        for text, (total, comps) in zip(texts, got):
            objs = M.parse_answer(text)
            objs = None if objs is None else M.to_original(objs, (HW, HW), (50, 50), 'pixel')
            masks = real(segment.ColorSegmenter(), img, objs or [])[0]
            ref_total, ref = R.reward(text, sample, masks, stage, objects=objs)
            assert total == pytest.approx(ref_total) and comps == pytest.approx(ref)
        assert got[0][1]['accuracy'] == (9 if stage == 1 else 10)  # the colour regions are exact
    assert len(calls) == 2 and seg.encoder_calls == 1               # one call per group, one encode


def test_score_group_is_the_same_in_any_chunking(monkeypatch):
    """Chunks of 1, 2, 3, 5 objects cut through rollouts' objects; the results never change, no
    segmenter call sees more than a chunk, and the image is encoded once for all of them."""
    img = np.zeros((HW, HW, 3), np.uint8)
    img[10:30, 10:30], img[50:90, 60:80], img[40:50, 40:50] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    sample = dataclasses.replace(gt(A, B), image=img)
    texts = [answer([A, B, C]), answer([B]), answer([]), 'garbage', answer([C, A, {}, dict(B, point_2d=None)]),
             answer([A] * 7), answer([dict(A, bbox_2d=[1e308, 0, 1, 1])]), answer([B, A])]
    sizes, real = [], segment.segment
    monkeypatch.setattr(segment, 'segment', lambda s, i, objs, **kw: sizes.append(len(objs)) or real(s, i, objs, **kw))
    seg = segment.ColorSegmenter()
    for stage in (1, 2):
        whole = R.score_group(texts, sample, seg, stage, (HW, HW), key='k')
        assert sizes == [17]  # 3 + 1 + 3 + 7 + 1 + 2 objects in one call
        for chunk in (1, 2, 3, 5):
            sizes.clear()
            assert R.score_group(texts, sample, seg, stage, (HW, HW), key='k', chunk=chunk) == whole
            assert max(sizes) == chunk and sum(sizes) == 17
        sizes.clear()
        assert whole[0][1]['accuracy'] == (16 / 3 if stage == 1 else 20 / 3)  # A, B exact; C extra
    assert seg.encoder_calls == 1


def test_score_group_memory_is_bounded_for_256_rollouts_on_4mp():
    """256 rollouts on a 2000 x 2000 image: all their masks would be 1 GB (the segmenter's copy
    another); by default a chunk holds R.MASK_BUDGET bytes (128 MiB) of bool masks at once."""
    H = W = 2000
    sample = data.Sample(id='big', image=np.zeros((H, W, 3), np.uint8), query='q', masks=np.zeros((1, H, W), bool))
    sample.masks[0, 100:200, 100:200] = True
    text = answer([{'label': 'box', 'bbox_2d': [100, 100, 199, 199], 'point_2d': [150, 150]}])
    seg = segment.ColorSegmenter()
    tracemalloc.start()
    try:
        out = R.score_group([text] * 256, sample, seg, 2, (W, H))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(c['accuracy'] == 10 for _, c in out) and seg.encoder_calls == 1  # the exact mask, 1 encode
    assert peak < 3 * R.MASK_BUDGET + 64 * 2 ** 20, f'{peak / 2 ** 20:.0f} MiB'
