"""Tests for the reward-side ablation flags (docs/method.md "Ablation flags"): --no-label (the label-free
format term, hand-computed and against a plain loop of the predecessors' rule; nothing else in the reward
moves) and --reward visionreasoner (hand-computed predecessor values incl. dilution by extra objects and
our no-object rule, brute force over matchings, the segmenter never called); label-free answers vote.
Run: python -m pytest -q tests/test_ablation_rewards.py
"""
import dataclasses, itertools, json, math, re
import numpy as np
import pytest
import torch

import model as M, rewards as R, segment, vote
from test_rewards import A, B, C, CASES, HW, NOLABEL, answer, brute_best, gt, loop_box_iou, own_masks
import inference


# ----------------------------------------------------------------- --no-label: the format term
@pytest.mark.parametrize('text, label_free, with_label', [
    (answer([NOLABEL]), 3, 1 + 4 / 3),                    # box + point: 2/1; ours: 2/3 * 2
    (answer([A]), 3, 3),                                  # a label, present, earns nothing and costs nothing
    (answer([NOLABEL, dict(NOLABEL, point_2d=None)]), 1 + 3 / 2, 1 + 2 / 3 * 3 / 2),
    (answer([NOLABEL, 7]), 1 + 2 / 2, 1 + 2 / 3 * 2 / 2),  # a junk item counts, earns nothing
    (answer([{'label': 'cup'}]), 1, 1 + 2 / 3),             # a label alone: no field credit now
    (answer([dict(NOLABEL, bbox_2d=['1', '2', '3', '4'])]), 1 + 1, 1 + 2 / 3),  # strings are no box
    (answer([]), 1, 1), (answer([NOLABEL], think=''), 2, 4 / 3),
    (json.dumps([NOLABEL]), 0, 0),                        # bare JSON is not the format
])
def test_label_free_format_by_hand(text, label_free, with_label):
    assert R.format_reward(text, label=False) == pytest.approx(label_free, abs=1e-12)
    assert R.format_reward(text) == pytest.approx(with_label, abs=1e-12)


def predecessor_format(text):
    """The label-free rule written plainly: tags, then per answer item 1 for a box of 4 finite numbers
    and 1 for a point of 2, averaged over the items."""
    tags = float(bool(re.fullmatch(r'<think>.*?</think>\s*<answer>.*?</answer>', text.strip(), re.S)))
    items = json.loads(text[text.index('<answer>') + 8:text.index('</answer>')])
    ok = lambda v, n: isinstance(v, list) and len(v) == n and all(  # noqa: E731
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not items:
        return tags
    fields = sum(ok(o.get('bbox_2d'), 4) + ok(o.get('point_2d'), 2) for o in items if isinstance(o, dict))
    return tags + fields / len(items)


def test_label_free_format_equals_the_plain_rule_on_random_answers():
    rng = np.random.default_rng(0)
    boxes = [[1, 2, 3, 4], [1.5, 2, 30, 40], [1, 2, 3], ['1', '2', '3', '4'], None, [True, 1, 2, 3]]
    points = [[5, 6], [5.5, 6], [5], ['5', '6'], None, [float('inf'), 1]]
    for _ in range(300):
        items = []
        for _ in range(rng.integers(0, 5)):
            o = {k: v for k, v in (('label', rng.choice(['cup', '', None])), ('bbox_2d', boxes[rng.integers(6)]),
                                   ('point_2d', points[rng.integers(6)])) if v is not None and rng.random() < 0.9}
            items.append(o if rng.random() < 0.9 else 7)
        text = answer(items, think='<think>x</think>' if rng.random() < 0.8 else '')
        assert R.format_reward(text, label=False) == pytest.approx(predecessor_format(text), abs=1e-12), text


def strip_labels(text):
    return re.sub(r'"label": "[^"]*",?\s*', '', text)


@pytest.mark.parametrize('name', CASES)
def test_no_label_changes_only_the_format_term(name):
    """On every hand-computed case: the label-free format, and the accuracy, non-repeat and "correct" of
    the default, whether the answer carries labels or not (labels never enter the accuracy)."""
    text, gt_objs, masks, stage, *_ = CASES[name]
    masks = own_masks(M.parse_answer(text)) if masks is None else masks
    sample = gt(*gt_objs)
    _, ref = R.reward(text, sample, masks, stage)
    for t in (text, strip_labels(text)):
        parsed, original = M.parse_answer(t), M.parse_answer(text)
        geometry = [[(o['bbox_2d'], o['point_2d']) for o in objs or []] for objs in (parsed, original)]
        if (parsed is None) != (original is None) or geometry[0] != geometry[1]:
            continue  # stripping the label changed what the answer says (a label-only item)
        total, got = R.reward(t, sample, masks, stage, label=False)
        assert {k: v for k, v in got.items() if k != 'format'} == {k: v for k, v in ref.items() if k != 'format'}
        assert got['format'] == R.format_reward(t, label=False) and total == pytest.approx(
            got['format'] + ref['accuracy'] + ref['non_repeat'])


# ----------------------------------------------------------------- --reward visionreasoner
A2 = dict(A, point_2d=[32, 20])
VR = {  # text, GT objects, accuracy 0-3 (per pair box IoU > .5 + mean |Δ| < 10 + point < 30 px in own box)
    'perfect': (answer([A, B]), [A, B], 3.0),                      # (3 + 3) / 2
    'swapped': (answer([B, A]), [A, B], 3.0),
    'one-of-two': (answer([A]), [A, B], 1.5),                      # 3 / max(1, 2): a missing object dilutes
    'one-extra': (answer([A, C, B]), [A, B], 2.0),                 # (3 + 3) / 3: C scores 0 with both
    'three-vs-one': (answer([A, A, C]), [A], 1.0),                 # 3 / 3
    'empty-vs-empty': (answer([]), [], 3.0),                       # our rule; the predecessors gave 0
    'empty-vs-two': (answer([]), [A, B], 0.0), 'one-vs-empty': (answer([A]), [], 0.0),
    'point-outside-box': (answer([A2]), [A], 2.0),                 # 12 px away, but x 32 > 29: no point term
    'box-iou-0.5': (answer([dict(A, bbox_2d=[10, 10, 29, 49])]), [A], 2.0),  # IoU 400/800 not > .5; |Δ| 5
    'box-l1-10': (answer([dict(A, bbox_2d=[20, 20, 39, 39], point_2d=[30, 30])]), [A], 1.0),  # |Δ| 10: no
    'point-30px': (answer([dict(A, bbox_2d=[10, 10, 59, 29], point_2d=[50, 20])]), [A], 1.0),  # |Δ| 7.5
    'no-point': (answer([dict(A, point_2d=None)]), [A], 2.0),
    'point-only': (answer([{'point_2d': [20, 20]}]), [A], 0.0),   # no box: not inside its own box either
    'cap-120': (answer([A] * 125), [A, B], 3 / 120),
    'unparsable': ('<think>x</think><answer>not json</answer>', [A], 0.0),
}


@pytest.mark.parametrize('name', VR)
def test_visionreasoner_accuracy_by_hand(name):
    text, gt_objs, acc = VR[name]
    for stage in (1, 2):  # no masks: both stages score alike (stage 2's GT boxes/points come from its masks)
        total, c = R.reward(text, gt(*gt_objs), None, stage, accuracy='visionreasoner')
        assert c['accuracy'] == pytest.approx(acc, abs=1e-12) and c['correct'] == (acc >= 2)
        assert total == pytest.approx(c['format'] + acc + c['non_repeat']) and c['format'] == R.format_reward(text)


def test_visionreasoner_accuracy_equals_loop_and_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(100):
        m, n = rng.integers(1, 6, size=2)
        gb = rng.integers(0, 40, size=(n, 4))
        gb[:, 2:] = gb[:, :2] + rng.integers(25, 40, size=(n, 2))
        pb = gb[rng.integers(0, n, m)] + rng.integers(-12, 13, size=(m, 4))
        gp, pp = rng.uniform(0, 60, (n, 2)), rng.uniform(0, 60, (m, 2))
        ref = np.zeros((m, n))
        for i, j in itertools.product(range(m), range(n)):
            inside = pb[i, 0] <= pp[i, 0] <= pb[i, 2] and pb[i, 1] <= pp[i, 1] <= pb[i, 3]
            ref[i, j] = (int(loop_box_iou(pb[i], gb[j]) > 0.5) + int(np.mean(np.abs(pb[i] - gb[j])) < 10)
                         + int(math.dist(pp[i], gp[j]) < 30 and inside))
        acc, _ = R.visionreasoner_accuracy(pb, pp, gb, gp)
        assert acc == pytest.approx(brute_best(ref) / max(m, n))


class Refusing:
    encoder_calls = 0

    def set_image(self, *a, **k):
        raise AssertionError('the segmenter was called')

    predict_batch = set_image


def test_visionreasoner_never_calls_the_segmenter(monkeypatch):
    monkeypatch.setattr(segment, 'segment', Refusing().set_image)
    sample = gt(A, B)
    half = lambda o: {**o, 'bbox_2d': [v / 2 for v in o['bbox_2d']], 'point_2d': [v / 2 for v in o['point_2d']]}
    texts = [answer([half(A), half(B)]), answer([half(B)]), answer([]), 'garbage', answer([half(C)], tail='. a. a. a')]
    for stage in (1, 2):
        got = R.score_group(texts, sample, Refusing(), stage, (HW // 2, HW // 2), accuracy='visionreasoner')
        for text, (total, comps) in zip(texts, got):
            objs = M.parse_answer(text)
            objs = None if objs is None else M.to_original(objs, (HW, HW), (HW // 2, HW // 2), 'pixel')
            assert (total, comps) == R.reward(text, sample, None, stage, objs, accuracy='visionreasoner')
        assert [c['accuracy'] for _, c in got] == [3.0, 1.5, 0.0, 0.0, 0.0] and got[4][1]['non_repeat'] == 0
    with pytest.raises(ValueError, match='accuracy must be'):
        R.score_group(texts, sample, Refusing(), 1, (HW, HW), accuracy='seg-zero')


def test_default_reward_is_unchanged_by_the_new_arguments():
    text, gt_objs, masks, stage, *_ = CASES['one-extra']
    masks = own_masks(M.parse_answer(text))
    assert R.reward(text, gt(*gt_objs), masks, stage) == R.reward(text, gt(*gt_objs), masks, stage, accuracy='star',
                                                                  label=True)


# ----------------------------------------------------------------- label-free answers vote
def test_votes_without_labels():
    m1, m2 = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    m1[:4, :4], m2[4:, 4:] = True, True
    labelled = [[(m1, 0.9, 'cup'), (m2, 0.5, 'mug')], [(m1, 0.8, 'cup')], [(m1, 0.7, 'cup'), (m2, 0.6, 'mug')], []]
    ref, ref_clusters, _ = vote.majority_vote(labelled)
    for drop in (lambda o: (o[0], o[1]), lambda o: (o[0], o[1], None), lambda o: (o[0], o[1], '')):
        mask, clusters, _ = vote.majority_vote([None if s is None else [drop(o) for o in s] for s in labelled])
        assert torch.equal(mask, ref) and [c['label'] for c in clusters] == [None, None]
        assert [{k: v for k, v in c.items() if k != 'label'} for c in clusters] == \
            [{k: v for k, v in c.items() if k != 'label'} for c in ref_clusters]
    mixed = [[(m1, 0.9, None)], [(m1, 0.8, 'cup')], [(m1, 0.7)]]  # the members that have a label name it
    assert vote.majority_vote(mixed)[1][0]['label'] == 'cup'


def test_predict_combines_label_free_answers():
    obj = {'bbox_2d': [0, 0, 3, 3], 'point_2d': [1, 1], 'label': None}  # what parse_answer gives without one
    masks = np.zeros((1, 8, 8), bool)
    masks[0, :4, :4] = True
    answers = [([obj], masks, np.ones(1))] * 3
    pred, layers, clusters, reason = inference.combine(answers, 3, shape=(8, 8))
    assert (pred == masks[0]).all() and clusters[0]['label'] is None and 'K=1' in reason
    assert dataclasses.is_dataclass(gt(A)) and len(layers) == 1
