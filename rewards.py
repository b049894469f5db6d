"""rewards.py: the verifiable rewards of StAR (method §5): format, non-repeat, mask tiers, stage-1 and
stage-2 accuracy with Hungarian matching, and `score_group`, which scores the G rollouts of one prompt
with one image encode and batched segmenter calls, a bounded number of masks at a time (method §4).
Mask IoU is exact popcounts of bit-packed masks; box IoU uses the +1-pixel convention.

Never raises on model output; every component stays in its range. "No object" is decided explicitly:
an empty answer on an empty ground truth is fully correct (9 in stage 1, 10 in stage 2, 3 under the
predecessors' accuracy). train.py's ablation flags choose `accuracy` (--reward) and `label` (--no-label).
Tested by: python -m pytest tests/test_rewards.py tests/test_fuzz.py
"""
import re
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
import answer as A
import segment as S

MASK_BUDGET = 1 << 27  # bytes of bool masks score_group holds at once (128 MiB: 32 masks of 4 MP)
_SPACE = re.compile(r'\s*')
_TIER_EDGES = np.array([0.3, 0.5, 0.7, 0.8, 0.9])  # tier = how many edges the IoU is strictly above
_NAN4, _NAN2 = [np.nan] * 4, [np.nan] * 2
ACCURACIES = ('star', 'visionreasoner')  # train.py --reward: ours (mask tiers, method §5) or the predecessors'



# --- IoU matrices: masks packed to bits (8 pixels a byte) and compared with exact popcounts, so G = 256
# rollouts' masks on a 4 MP image cost no float copies; boxes with the +1-pixel convention (method §5) ---

def pack_masks(masks):
    """(K, H, W) bool masks (numpy or torch) -> (K, ceil(H*W/8)) uint8, 8 pixels a byte."""
    masks = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks, bool)
    return np.packbits(masks.reshape(len(masks), int(np.prod(masks.shape[1:]))), axis=1)


def packed_iou(a, b):
    """Packed masks (M, P) x (N, P) -> (M, N) float64 IoU, inter / (union + 1e-6) (method §5). Counts are
    exact popcounts of the ANDed bits: no float copy of the masks, and the AND reads 1/8 of their bytes."""
    area_a, area_b = np.bitwise_count(a).sum(1, dtype=np.int64), np.bitwise_count(b).sum(1, dtype=np.int64)
    inter = np.zeros((len(a), len(b)), np.int64)
    for j, g in enumerate(b):
        inter[:, j] = np.bitwise_count(a & g).sum(1, dtype=np.int64)
    return inter / (area_a[:, None] + area_b[None] - inter + 1e-6)


def mask_iou_matrix(a, b):
    """(M,H,W) x (N,H,W) bool -> (M,N) float64 numpy, inter / (union + 1e-6)."""
    return packed_iou(pack_masks(a), pack_masks(b))


def box_iou_matrix(a, b):
    """(M,4) x (N,4) x1,y1,x2,y2 -> (M,N) IoU with the +1-pixel convention, (x2-x1+1)(y2-y1+1)."""
    a = np.asarray(a, float).reshape(-1, 4)[:, None]  # (M, 1, 4)
    b = np.asarray(b, float).reshape(-1, 4)[None]     # (1, N, 4)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None)
    area = lambda x: (x[..., 2] - x[..., 0] + 1) * (x[..., 3] - x[..., 1] + 1)  # noqa: E731
    inter = iw * ih
    return inter / (area(a) + area(b) - inter)


def _tags_match(s):
    """re.fullmatch(r'<think>.*?</think>\\s*<answer>.*?</answer>', s, re.S), in linear time (the regex
    backtracks quadratically on '</think><answer>' repeated). It holds when s starts with <think>, ends
    with </answer>, and the first </think> followed (after whitespace) by <answer> opens an answer that
    ends at or before that final </answer>: a later such </think> could only open it later."""
    if not (s.startswith('<think>') and s.endswith('</answer>')):
        return False
    close = s.find('</think>', 7)
    while close >= 0:
        start = _SPACE.match(s, close + 8).end()
        if s.startswith('<answer>', start):
            return start + 8 <= len(s) - 9
        close = s.find('</think>', close + 8)
    return False


def format_reward(text, label=True):
    """0-3 (method §5). Tags (1): the tag pattern must match the whole stripped response, so surrounding
    whitespace is forgiven but any other text before <think> or after </answer> is not. Fields (0-2):
    only when an <answer>...</answer> block exists (bare JSON is not the format); 2/3 per valid field,
    averaged over the answer's items as the reference does (valid = a list of 4 / 2 finite numbers, a
    non-empty label). Items that are not objects ({}, 7) count and earn nothing; all items count, even
    past answer.MAX_OBJECTS. label=False (--no-label): the predecessors' rule, 1 per valid box and 1 per
    valid point, averaged over the items; a label, present or not, earns nothing."""
    if not isinstance(text, str):
        return 0.0
    return _format(text, A.answer_items(text, bare_json=False), label)


def _format(text, items, label=True):
    """format_reward from the text and its decoded answer items (answer.answer_items, either mode): the
    fields earn credit only from an <answer> block, so items decoded from bare JSON earn nothing."""
    tags = 1.0 if _tags_match(text.strip()) else 0.0
    if not items or A.answer_block(text) is None:  # unparsable, empty, or not in an answer block
        return tags
    fields = [A.object_fields(o) for o in items if isinstance(o, dict) and o]
    if label:
        return tags + 2.0 * sum(v is not None for f in fields for v in f.values()) / (3 * len(items))
    return tags + sum((f['bbox_2d'] is not None) + (f['point_2d'] is not None) for f in fields) / len(items)


def non_repeat_reward(text):
    """0/1 (method §5). Sentences = pieces between '.', stripped, empties dropped. Every occurrence of
    a sentence already seen counts as one repeat; 2 or more repeats -> 0. So one sentence said twice
    is tolerated, said three times (2 repeats) is not, nor are two sentences each said twice."""
    seen, repeats = set(), 0
    for s in (p.strip() for p in str(text).split('.')):
        if s:
            repeats += s in seen
            seen.add(s)
    return 0.0 if repeats >= 2 else 1.0


def mask_tier(value):
    """IoU -> tier 0-5 (≤.3:0, ≤.5:1, ≤.7:2, ≤.8:3, ≤.9:4, else 5); works on scalars and arrays."""
    t = (np.asarray(value, float)[..., None] > _TIER_EDGES).sum(-1)
    return int(t) if t.ndim == 0 else t


def stage1_pair_scores(tiers, pred_boxes, pred_points, gt_boxes, gt_points):
    """(M,N) per-pair totals 0-8 (method §5): mask tier + [box IoU > 0.5] + [mean |Δ box| < 10 px]
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
    """0-9 (method §5): Σ matched pair totals / max(M,N) + 1 if M == N. Returns (accuracy, matched
    tier mean), the latter Σ matched tiers / max(M,N) (missing/extra objects count as tier 0)."""
    tiers = np.asarray(tiers).reshape(len(pred_boxes), len(gt_boxes))
    m, n = tiers.shape
    if m == 0 or n == 0:  # "no object": right only when both are empty
        return (9.0, 5.0) if m == n else (0.0, 0.0)
    score = stage1_pair_scores(tiers, pred_boxes, pred_points, gt_boxes, gt_points)
    r, c = best_matching(score, 8)
    return float(score[r, c].sum() / max(m, n) + (m == n)), float(tiers[r, c].sum() / max(m, n))


def stage2_accuracy(tiers):
    """0-10 (method §5): 2 × Σ matched tiers / max(M,N), Hungarian on 5 - tier. Returns (accuracy,
    matched tier mean) as stage1_accuracy does; empty vs empty is (10, 5), other empties (0, 0)."""
    tiers = np.asarray(tiers)
    m, n = tiers.shape
    if m == 0 or n == 0:
        return (10.0, 5.0) if m == n else (0.0, 0.0)
    r, c = best_matching(tiers, 5)
    mean = float(tiers[r, c].sum() / max(m, n))
    return 2.0 * mean, mean


def visionreasoner_accuracy(pred_boxes, pred_points, gt_boxes, gt_points):
    """0-3, the predecessors' (VisionReasoner's) accuracy, no masks (method §5, "Ablation flags"): per
    pair [box IoU > 0.5] + [mean |Δ box| < 10 px] + [point within 30 px AND inside its own box],
    Hungarian on 3 - total, Σ matched / max(M,N): extra or missing objects dilute it, and there is no
    bonus for M == N. Our no-object rule stays: empty vs empty is (3, 3), other empties (0, 0).
    Returns (accuracy, the same number): with no masks, the matched mean pair total stands in for the
    matched mean tier ("correct" when >= 2, two of the three checks on average)."""
    m, n = len(pred_boxes), len(gt_boxes)
    if m == 0 or n == 0:
        return (3.0, 3.0) if m == n else (0.0, 0.0)
    score = stage1_pair_scores(np.zeros((m, n)), pred_boxes, pred_points, gt_boxes, gt_points)
    r, c = best_matching(score, 3)
    acc = float(score[r, c].sum() / max(m, n))
    return acc, acc


def _geometry(objects, sample):
    """Predicted boxes/points (NaN rows where missing: they earn nothing) and the GT's, in original px."""
    if len(sample.masks) and (sample.boxes is None or sample.points is None):
        raise ValueError('this accuracy needs GT boxes and points (method §5; data.boxes_points makes them)')
    gb = sample.boxes if len(sample.masks) else np.zeros((0, 4))
    gp = sample.points if len(sample.masks) else np.zeros((0, 2))
    pb = [_NAN4 if o.get('bbox_2d') is None else o['bbox_2d'] for o in objects]
    pp = [_NAN2 if o.get('point_2d') is None else o['point_2d'] for o in objects]
    return pb, pp, gb, gp


def _check(stage, accuracy):
    if stage not in (1, 2):
        raise ValueError(f'stage must be 1 or 2, got {stage!r}')
    if accuracy not in ACCURACIES:
        raise ValueError(f'accuracy must be one of {ACCURACIES}, got {accuracy!r}')


def _score(text, items, objects, ious, sample, stage, accuracy='star', label=True):
    """One rollout: its decoded answer items, objects (parsed, original px, or None) and their mask IoUs
    (M,N) with the GT (None for the mask-free 'visionreasoner' accuracy, which scores both stages alike).
    The items are decoded once for both the format and the objects (~20 ms for 200k characters)."""
    fmt, rep = _format(text, items, label) if isinstance(text, str) else 0.0, non_repeat_reward(text)
    acc, tier = 0.0, 0.0  # unparsable: no accuracy
    if objects is not None and accuracy == 'visionreasoner':
        acc, tier = visionreasoner_accuracy(*_geometry(objects, sample))
    elif objects is not None:
        tiers = mask_tier(np.asarray(ious).reshape(len(objects), len(sample.masks)))
        acc, tier = stage1_accuracy(tiers, *_geometry(objects, sample)) if stage == 1 else stage2_accuracy(tiers)
    comps = dict(format=fmt, accuracy=acc, non_repeat=rep, correct=tier >= 2,
                 n_pred=len(objects or []), mean_tier=tier)
    return fmt + acc + rep, comps


def reward(text, sample, masks, stage, objects=None, accuracy='star', label=True):
    """One response -> (total, components). masks (K,H,W): the predicted mask of each object, aligned
    with `objects` (the parsed objects in original px; default answer.parse_answer(text) as is); unused
    (may be None) with accuracy='visionreasoner'. label=False: the label-free format term."""
    _check(stage, accuracy)
    items = A.answer_items(text) if isinstance(text, str) else None
    if objects is None:
        objects = A.answer_objects(items)
    if accuracy == 'visionreasoner' or objects is None:
        return _score(text, items, objects, None, sample, stage, accuracy, label)
    if len(masks) != len(objects):
        raise ValueError(f'{len(masks)} masks for {len(objects)} objects')
    return _score(text, items, objects, mask_iou_matrix(masks, sample.masks), sample, stage, accuracy, label)


def score_group(texts, sample, segmenter, stage, input_wh, coord_mode='pixel', key=None, chunk=None,
                accuracy='star', label=True):
    """The G rollouts of one prompt -> [(total, components)]. The image is encoded once (cached under
    `key`, default the sample's id); the objects of all rollouts are segmented `chunk` at a time
    (default: MASK_BUDGET bytes of masks), each chunk's masks packed to bits and compared with the GT
    at once, then dropped: memory stays bounded for G = 256 on large images. Chunks may split a
    rollout's objects; the result does not depend on `chunk`. accuracy='visionreasoner' needs no
    masks: the segmenter is never called. label=False: the label-free format term."""
    _check(stage, accuracy)  # before any segmenter call
    H, W = sample.image.shape[:2]
    items = [A.answer_items(t) if isinstance(t, str) else None for t in texts]
    answers = A.place_objects([A.answer_objects(i) for i in items], (W, H), input_wh, coord_mode)
    if accuracy == 'visionreasoner':
        return [_score(text, its, objs, None, sample, stage, accuracy, label)
                for text, its, objs in zip(texts, items, answers)]
    flat = [o for objs in answers for o in objs or []]
    chunk = chunk or max(1, MASK_BUDGET // (H * W))
    key = sample.id if key is None else key
    gt = pack_masks(sample.masks)
    ious = [np.zeros((0, len(gt)))]
    for i in range(0, len(flat), chunk):
        masks, _ = S.segment(segmenter, sample.image, flat[i:i + chunk], key=key)  # (c, H, W) bool
        ious.append(packed_iou(pack_masks(masks), gt))                      # (c, N)
    ious, out, start = np.concatenate(ious), [], 0
    for text, its, objs in zip(texts, items, answers):
        m = len(objs or [])
        out.append(_score(text, its, objs, ious[start:start + m], sample, stage, accuracy, label))
        start += m
    return out
