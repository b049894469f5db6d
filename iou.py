"""iou.py: IoU matrices for the rewards (method §5): masks packed to bits (8 pixels a byte) and compared
with exact popcounts, so G = 256 rollouts' masks on a 4 MP image cost no float copies; boxes with the
+1-pixel convention. Used by rewards.py (the mask tiers, the stage-1 box term).
Tested by: python -m pytest tests/test_rewards.py -k iou
"""
import numpy as np
import torch


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
