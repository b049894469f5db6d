"""rewards.py: the verifiable rewards of StAR (SPEC §5): format, non-repeat, mask tiers, stage-1 and
stage-2 accuracy with Hungarian matching, and `score_group`, which scores the G rollouts of one prompt
with a single batched segmenter call (SPEC §4).

Never raises on model output; every component stays in its range. "No object" is decided explicitly:
an empty answer on an empty ground truth is fully correct (9 in stage 1, 10 in stage 2).
Tested by: python -m pytest tests/test_rewards.py
"""
import re
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
import model as M

_TAGS = re.compile(r'<think>.*?</think>\s*<answer>.*?</answer>', re.S)
_ANSWER = re.compile(r'<answer>.*?</answer>', re.S)
_TIER_EDGES = np.array([0.3, 0.5, 0.7, 0.8, 0.9])  # tier = how many edges the IoU is strictly above
_NAN4, _NAN2 = [np.nan] * 4, [np.nan] * 2


def format_reward(text):
    """0-3 (SPEC §5). Tags (1): `re.fullmatch` on the stripped response, so surrounding whitespace is
    forgiven but any other text before <think> or after </answer> is not. Fields (0-2): only when an
    <answer>...</answer> block exists (bare JSON is not the format); 2/3 per valid field, averaged
    over model.parse_answer's objects (valid = a list of 4 / 2 finite numbers, a non-empty label)."""
    if not isinstance(text, str):
        return 0.0
    tags = 1.0 if _TAGS.fullmatch(text.strip()) else 0.0
    objs = M.parse_answer(text) if _ANSWER.search(text) else None
    if not objs:  # unparsable or empty answer: no field credit
        return tags
    n_valid = sum(o.get(k) is not None for o in objs for k in ('bbox_2d', 'point_2d', 'label'))
    return tags + 2.0 * n_valid / (3 * len(objs))


def non_repeat_reward(text):
    """0/1 (SPEC §5). Sentences = pieces between '.', stripped, empties dropped. Every occurrence of
    a sentence already seen counts as one repeat; 2 or more repeats -> 0. So one sentence said twice
    is tolerated, said three times (2 repeats) is not, nor are two sentences each said twice."""
    seen, repeats = set(), 0
    for s in (p.strip() for p in str(text).split('.')):
        if s:
            repeats += s in seen
            seen.add(s)
    return 0.0 if repeats >= 2 else 1.0


def mask_tier(iou):
    """IoU -> tier 0-5 (≤.3:0, ≤.5:1, ≤.7:2, ≤.8:3, ≤.9:4, else 5); works on scalars and arrays."""
    t = (np.asarray(iou, float)[..., None] > _TIER_EDGES).sum(-1)
    return int(t) if t.ndim == 0 else t


def mask_iou_matrix(a, b):
    """(M,H,W) x (N,H,W) bool -> (M,N) float64 numpy, inter / (union + 1e-6), one matmul in torch.
    fp32 sums of 0/1 are exact below 2^24 pixels; the division is done in fp64 so that an IoU
    exactly on a tier edge (e.g. 30/100) is not pushed over it by fp32 rounding."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b, device=a.device)
    hw = a.shape[-2] * a.shape[-1]
    dt = torch.float32 if hw < 2 ** 24 else torch.float64
    fa, fb = a.reshape(len(a), hw).to(dt), b.reshape(len(b), hw).to(dt)  # (M, HW), (N, HW)
    inter = (fa @ fb.T).double()                                          # (M, N)
    union = fa.sum(1).double()[:, None] + fb.sum(1).double()[None] - inter
    return (inter / (union + 1e-6)).cpu().numpy()


def box_iou_matrix(a, b):
    """(M,4) x (N,4) x1,y1,x2,y2 -> (M,N) IoU with the +1-pixel convention, (x2-x1+1)(y2-y1+1)."""
    a = np.asarray(a, float).reshape(-1, 4)[:, None]  # (M, 1, 4)
    b = np.asarray(b, float).reshape(-1, 4)[None]     # (1, N, 4)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None)
    area = lambda x: (x[..., 2] - x[..., 0] + 1) * (x[..., 3] - x[..., 1] + 1)  # noqa: E731
    inter = iw * ih
    return inter / (area(a) + area(b) - inter)


def stage1_pair_scores(tiers, pred_boxes, pred_points, gt_boxes, gt_points):
    """(M,N) per-pair totals 0-8 (SPEC §5): mask tier + [box IoU > 0.5] + [mean |Δ box| < 10 px]
    + [point within 30 px of the GT point AND inside its own predicted box]. Missing predicted
    boxes/points are NaN rows: every test on NaN is False, so they earn nothing."""
    pb, pp = np.asarray(pred_boxes, float).reshape(-1, 4), np.asarray(pred_points, float).reshape(-1, 2)
    gb, gp = np.asarray(gt_boxes, float).reshape(-1, 4), np.asarray(gt_points, float).reshape(-1, 2)
    with np.errstate(all='ignore'):  # absurd coordinates (1e308) overflow to inf/nan: just fail
        box_ok = box_iou_matrix(pb, gb) > 0.5
        l1_ok = np.abs(pb[:, None] - gb[None]).mean(-1) < 10
        near = np.sqrt(((pp[:, None] - gp[None]) ** 2).sum(-1)) < 30
        inside = ((pb[:, 0] <= pp[:, 0]) & (pp[:, 0] <= pb[:, 2]) &
                  (pb[:, 1] <= pp[:, 1]) & (pp[:, 1] <= pb[:, 3]))
    return np.asarray(tiers) + box_ok + l1_ok + (near & inside[:, None])


def best_matching(score, best):
    """Hungarian pairing of min(M,N) rows/columns maximising Σ score (cost = best - score)."""
    return linear_sum_assignment(best - np.asarray(score, float))


def stage1_accuracy(tiers, pred_boxes, pred_points, gt_boxes, gt_points):
    """0-9 (SPEC §5): Σ matched pair totals / max(M,N) + 1 if M == N. Returns (accuracy, matched
    tier mean), the latter Σ matched tiers / max(M,N) (missing/extra objects count as tier 0)."""
    tiers = np.asarray(tiers).reshape(len(pred_boxes), len(gt_boxes))
    m, n = tiers.shape
    if m == 0 or n == 0:  # "no object": right only when both are empty
        return (9.0, 5.0) if m == n else (0.0, 0.0)
    score = stage1_pair_scores(tiers, pred_boxes, pred_points, gt_boxes, gt_points)
    r, c = best_matching(score, 8)
    return float(score[r, c].sum() / max(m, n) + (m == n)), float(tiers[r, c].sum() / max(m, n))


def stage2_accuracy(tiers):
    """0-10 (SPEC §5): 2 × Σ matched tiers / max(M,N), Hungarian on 5 - tier. Returns (accuracy,
    matched tier mean) as stage1_accuracy does; empty vs empty is (10, 5), other empties (0, 0)."""
    tiers = np.asarray(tiers)
    m, n = tiers.shape
    if m == 0 or n == 0:
        return (10.0, 5.0) if m == n else (0.0, 0.0)
    r, c = best_matching(tiers, 5)
    mean = float(tiers[r, c].sum() / max(m, n))
    return 2.0 * mean, mean


def _score(text, objects, ious, sample, stage):
    """One rollout: objects (parsed, original px, or None) and their mask IoUs (M,N) with the GT."""
    fmt, rep = format_reward(text), non_repeat_reward(text)
    acc, tier = 0.0, 0.0  # unparsable: no accuracy
    if objects is not None:
        tiers = mask_tier(np.asarray(ious).reshape(len(objects), len(sample.masks)))
        if stage == 1:
            if len(sample.masks) and (sample.boxes is None or sample.points is None):
                raise ValueError('stage-1 reward needs GT boxes and points (SPEC §5)')
            gb = sample.boxes if len(sample.masks) else np.zeros((0, 4))
            gp = sample.points if len(sample.masks) else np.zeros((0, 2))
            pb = [_NAN4 if o.get('bbox_2d') is None else o['bbox_2d'] for o in objects]
            pp = [_NAN2 if o.get('point_2d') is None else o['point_2d'] for o in objects]
            acc, tier = stage1_accuracy(tiers, pb, pp, gb, gp)
        elif stage == 2:
            acc, tier = stage2_accuracy(tiers)
        else:
            raise ValueError(f'stage must be 1 or 2, got {stage!r}')
    comps = dict(format=fmt, accuracy=acc, non_repeat=rep, correct=tier >= 2,
                 n_pred=len(objects or []), mean_tier=tier)
    return fmt + acc + rep, comps


def reward(text, sample, masks, stage, objects=None):
    """One response -> (total, components). masks (K,H,W): the predicted mask of each object, aligned
    with `objects` (the parsed objects in original px; default model.parse_answer(text) as is)."""
    if objects is None:
        objects = M.parse_answer(text)
    if objects is not None and len(masks) != len(objects):
        raise ValueError(f'{len(masks)} masks for {len(objects)} objects')
    ious = None if objects is None else mask_iou_matrix(masks, sample.masks)
    return _score(text, objects, ious, sample, stage)


def score_group(texts, sample, segmenter, stage, input_wh, coord_mode='pixel', key=None):
    """The G rollouts of one prompt -> [(total, components)]. Every object of every rollout goes
    through ONE segmenter call (pipeline.segment_answers: image encoded once, cached by `key`); the
    GT masks are flattened once in one IoU matmul against all predicted masks (SPEC §4)."""
    import pipeline  # the inference path: parse, map to the original image, segment
    answers = pipeline.segment_answers(segmenter, sample, texts, input_wh, coord_mode, key=key)
    masks = np.concatenate([m for _, m, _ in answers]) if answers else np.zeros((0, *sample.image.shape[:2]), bool)
    ious = mask_iou_matrix(masks, sample.masks)                        # (Σ M, N)
    out, start = [], 0
    for text, (objs, m, _) in zip(texts, answers):
        out.append(_score(text, objs, ious[start:start + len(m)], sample, stage))
        start += len(m)
    return out
