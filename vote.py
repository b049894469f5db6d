"""vote.py: mask-level majority voting over N sampled answers to one query, the parallel
test-time scaling of StAR (method §10).

Each sample is None (unparsable: abstains), [] (a "no object" vote), or a list of
(mask (H, W) bool tensor/array, SAM score, label) per predicted object; the label may be None or
left out (label-free answers, train.py --no-label): it only names the cluster. All pairwise mask IoUs come
from one Gram matrix of the flattened masks; the clustering itself is the greedy first-member rule.
Tested by: python -m pytest tests/test_vote.py
"""
import numpy as np
import torch

# Pixels per Gram block on CPU: one reused (P, CPU_CHUNK) buffer (~6 MB for 96 masks) instead of
# a fresh P x H*W copy, whose page faults cost more than the product; int8 GEMMs are slow below ~64K.
CPU_CHUNK = 1 << 16


def _cpu_gram(flat):
    """P flat (H*W,) bool CPU masks -> (P, P) int64 pixel intersection counts, exact.
    The pixels are cut into blocks; a block's product only takes the masks that have a pixel in it
    (objects are compact, so most masks skip most blocks: ~3x less copying, ~5x fewer MACs than the
    dense Gram). A block's masks are copied side by side and multiplied as int8 (bool and int8 share
    the byte layout): no float copy, int32 sums. numpy does the copy because it copies serially:
    torch's parallel copies of many small slices stall when the cores are shared."""
    flat = [f.numpy() for f in flat]
    d, p = flat[0].size, len(flat)
    c = min(d, CPU_CHUNK)
    nb, k = -(-d // c), 8 if d % 8 == 0 and c % 8 == 0 else 1  # blocks; pixels per word read
    occ = np.zeros((p, nb), bool)  # (P, blocks): mask i has a pixel in block b
    for i, f in enumerate(flat):
        w, cw = (f.view(np.uint64) if k == 8 else f), c // k  # any() over 8-pixel words: 8x fewer reads
        n = len(w) // cw * cw
        occ[i, :n // cw] = w[:n].reshape(-1, cw).max(1) > 0  # max: SIMD, 2x any()
        if n < len(w):
            occ[i, -1] = w[n:].max() > 0
    buf = np.empty(p * c, dtype=bool)
    inter = torch.zeros(p, p, dtype=torch.int64)
    for b in range(nb):
        rows = np.flatnonzero(occ[:, b])
        if len(rows) == 0:
            continue
        lo, hi = b * c, min(d, b * c + c)
        block = buf[:len(rows) * (hi - lo)].reshape(len(rows), -1)  # (p_b, C), contiguous when ragged too
        np.stack([flat[r][lo:hi] for r in rows], out=block)
        i8 = torch.from_numpy(block).view(torch.int8)
        ix = torch.from_numpy(rows)
        inter[ix[:, None], ix] += torch._int_mm(i8, i8.T)  # (p_b, p_b) int32
    return inter


def pairwise_iou(masks):
    """P masks (H, W) bool, one device -> ((P, P) float64 IoU, (P,) int64 areas).
    IoU = inter / union exactly (method §10.4: no epsilon, so 17/20 pixels is 0.85 and joins; two empty
    masks have IoU 0); one correctly rounded float64 division of exact counts, as Python's would be."""
    flat = [m.reshape(-1) for m in masks]
    if flat[0].device.type == 'cpu':
        inter = _cpu_gram(flat)
    else:  # one GEMM; 0/1 are exact in fp32 (and TF32), and so are sums below 2^24 pixels
        f = torch.stack(flat).to(torch.float32 if flat[0].numel() < 1 << 24 else torch.float64)
        inter = (f @ f.T).round().long()  # (P, P)
    area = inter.diagonal()  # (P,)
    union = area[:, None] + area[None, :] - inter  # (P, P)
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 0.0), area


def _cluster(iou, thr):
    """Greedy first-member clustering (method §10.4) on a precomputed (P, P) IoU table (lists):
    object p joins the first cluster whose FIRST member overlaps it by >= thr, else opens one."""
    clusters = []  # lists of object indices; clusters[c][0] is the representative
    for p in range(len(iou)):
        for c in clusters:
            if iou[c[0]][p] >= thr:
                c.append(p)
                break
        else:
            clusters.append([p])
    return clusters


def _most_common(xs):
    """Most frequent value; ties go to the value seen first (dicts keep insertion order); None if none."""
    counts = {}
    for x in xs:
        counts[x] = counts.get(x, 0) + 1
    return max(counts, key=counts.get, default=None)


NO_OBJECT, CLUSTER_IOU, VOTE_RATIO = 0.5, 0.85, 0.2  # method §10: the reference's thresholds


def majority_vote(samples, no_object_thresh=NO_OBJECT, cluster_iou=CLUSTER_IOU, vote_ratio=VOTE_RATIO, agg='best',
                  pixel_thresh=0.5, shape=None):
    """Vote N samples of one query into one mask (method §10).

    Returns (mask, clusters, reason):
      mask: (H, W) bool tensor on the masks' device; all False for "no object". When no sample
        holds any mask, H, W come from `shape`; without it the mask is None.
      clusters: one dict per cluster, in creation order: members [(sample_idx, obj_idx)], votes
        (distinct samples), score (mean SAM score), label (most common among the members that have
        one; None when none has), kept (in the output).
      reason: one line saying why the output is what it is (for eval's drawings and logs).
    agg: 'best' = each kept cluster's highest-score member (then largest area, then first);
         'consensus' = pixels whose score-weighted member average >= pixel_thresh (> 0).
    """
    if agg not in ('best', 'consensus'):
        raise ValueError(f'agg must be "best" or "consensus", not {agg!r}')
    valid = [i for i, s in enumerate(samples) if s is not None]  # §10.1: unparsable abstains
    objs = [(i, j, torch.as_tensor(o[0]).bool(), float(o[1]), str(o[2]) if len(o) > 2 and o[2] else None)
            for i in valid for j, o in enumerate(samples[i])]
    device = objs[0][2].device if objs else None
    shape = tuple(objs[0][2].shape) if objs else shape
    empty = None if shape is None else torch.zeros(shape, dtype=torch.bool, device=device)
    if not valid:
        return empty, [], f'no parsable sample (0/{len(samples)})'
    n_valid, n_none = len(valid), sum(len(samples[i]) == 0 for i in valid)
    if n_none / n_valid >= no_object_thresh:  # §10.2
        return empty, [], f'no-object majority ({n_none}/{n_valid} valid samples)'
    k_hat = _most_common(len(samples[i]) for i in valid if samples[i])  # §10.3

    masks = [o[2].to(device) for o in objs]
    iou, area = pairwise_iou(masks)  # (P, P), (P,)
    area = area.tolist()
    groups = _cluster(iou.tolist(), cluster_iou)  # §10.4, lists of object indices
    clusters = []
    for g in groups:
        scores = [objs[p][3] for p in g]
        clusters.append({'members': [objs[p][:2] for p in g], 'votes': len({objs[p][0] for p in g}),
                         'score': sum(scores) / len(scores),
                         'label': _most_common(objs[p][4] for p in g if objs[p][4] is not None),
                         'kept': False})
    # §10.5: drop thin clusters (unless that drops all), rank by (votes, mean score), keep top K̂
    pool = [k for k, c in enumerate(clusters) if c['votes'] / n_valid >= vote_ratio]
    note = f'{len(clusters) - len(pool)} below vote ratio'
    if not pool:
        pool, note = list(range(len(clusters))), 'all below vote ratio, kept all'
    ranked = sorted(pool, key=lambda k: (-clusters[k]['votes'], -clusters[k]['score']))  # stable
    out = empty.clone()
    for k in ranked[:k_hat]:  # §10.6
        clusters[k]['kept'] = True
        g = groups[k]
        out |= _aggregate([masks[p] for p in g], [objs[p][3] for p in g], [area[p] for p in g],
                          agg, pixel_thresh)
    return out, clusters, f'K={k_hat}: kept {min(k_hat, len(ranked))} of {len(clusters)} ' \
                          f'clusters ({note})'


def explain(reason):
    """majority_vote's reason -> the vote's terms it uses, in words, for a reader who has not read
    method §10 (the overlays print them under the picture). '' for a greedy answer."""
    words = [('no parsable', 'no parsable sample: no sample gave a readable answer, so there is no answer '
              '(not "no object")'),
             ('no-object majority', f'no-object majority: at least {NO_OBJECT:.0%} of the readable samples '
              'answered "no object"'),
             ('K=', 'K = how many objects most samples answered; the K clusters found by the most samples are kept'),
             ('clusters', f'cluster = one object as several samples found it (masks overlapping, IoU >= '
              f'{CLUSTER_IOU}); votes = how many samples found it'),
             ('below vote ratio', f'below vote ratio = found by fewer than {VOTE_RATIO:.0%} of the readable '
              'samples: dropped')]
    return '; '.join(text for key, text in words if key in (reason or ''))


def _aggregate(masks, scores, areas, agg, pixel_thresh):
    """One cluster -> one (H, W) bool mask (method §10.6)."""
    if agg == 'best':  # highest score, then largest area; max() keeps the first on full ties
        return masks[max(range(len(masks)), key=lambda k: (scores[k], areas[k]))]
    # Score-weighted pixel average, in float64 and member order. SAM scores are IoU estimates and can
    # be ~0 or negative: equal weights only when every score is <= 0 (method §10.6, as the reference;
    # mixed signs keep their weights, and scores summing to exactly 0 select no pixel, as the
    # reference's NaN average does). Outside the members' bounding box the average is 0: only the box
    # is summed.
    w = scores if any(s > 0 for s in scores) else [1.0] * len(scores)
    union = torch.zeros_like(masks[0])
    for m in masks:
        union |= m
    ys, xs = union.any(1).nonzero()[:, 0], union.any(0).nonzero()[:, 0]
    out = torch.zeros_like(union)
    if len(ys) == 0 or sum(w) == 0:
        return out
    box = slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)
    acc = torch.zeros(union[box].shape, dtype=torch.float64, device=union.device)
    for m, wk in zip(masks, w):
        acc.add_(m[box], alpha=wk)  # bool m: adds wk where set, no temporary
    out[box] = acc / sum(w) >= pixel_thresh
    return out
