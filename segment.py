"""segment.py: the frozen segmenter side of StAR (SPEC §4): box + point -> mask.

Three segmenters share one interface (SAM's argument names): `set_image(image, key=None)` and
`predict_batch(boxes (K,4), points (K,2)) -> masks (K,H,W) bool, scores (K,)` (best of SAM's 3).
- SamSegmenter: segment_anything's SamPredictor from a vit_b|vit_l|vit_h checkpoint, or a tiny
  random SAM for tests. The image embedding is cached per key: the G rollouts of one prompt (and
  every object in them) share ONE encoder pass, and all their prompts go through the light mask
  decoder as one batch (predict_torch) - the reference re-encodes the image for every rollout.
- ColorSegmenter: for the synthetic world; grows the flat colour region under the point inside
  the box, like a good SAM on flat-coloured shapes.
Tested by: python -m pytest tests/test_segment.py
"""
import os
import numpy as np
import torch
from scipy import ndimage


class SamSegmenter:
    def __init__(self, sam):
        from segment_anything import SamPredictor
        self.predictor = SamPredictor(sam)
        self.key, self.encoder_calls = None, 0

    def set_image(self, image, key=None):
        """Encode once per key; a new key (or key=None) re-encodes."""
        if key is not None and key == self.key:
            return
        self.predictor.set_image(np.ascontiguousarray(image))  # (H, W, 3) uint8 RGB
        self.key, self.encoder_calls = key, self.encoder_calls + 1

    @torch.no_grad()
    def predict_batch(self, boxes, points):
        """SamPredictor.predict_torch's steps, but identical prompts (rollouts often agree) are
        decoded once, and only the best of the 3 masks is upscaled to the image size."""
        p, sam = self.predictor, self.predictor.model
        prompts = np.concatenate([np.asarray(boxes, float), np.asarray(points, float)], 1)  # (K, 6)
        uniq, inverse = np.unique(prompts, axis=0, return_inverse=True)
        box = torch.as_tensor(p.transform.apply_boxes(uniq[:, :4], p.original_size), dtype=torch.float, device=p.device)
        pts = torch.as_tensor(p.transform.apply_coords(uniq[:, None, 4:], p.original_size), dtype=torch.float, device=p.device)
        sparse, dense = sam.prompt_encoder(points=(pts, torch.ones(len(uniq), 1, device=p.device)),  # foreground
                                           boxes=box, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=p.features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True)                     # (U, 3, 256, 256), (U, 3)
        best = iou.argmax(1)                                                    # (U,)
        u = torch.arange(len(uniq), device=p.device)
        masks = sam.postprocess_masks(low[u, best][:, None], p.input_size, p.original_size)[:, 0]
        masks, scores = (masks > sam.mask_threshold).cpu().numpy(), iou[u, best].float().cpu().numpy()
        return masks[inverse.reshape(-1)], scores[inverse.reshape(-1)]


def load_sam(checkpoint, sam_type='vit_h', device='cpu'):
    """A SamSegmenter from a segment-anything checkpoint file, with a clear error if unusable."""
    from segment_anything import sam_model_registry
    if sam_type not in sam_model_registry or sam_type == 'default':
        raise ValueError(f'--sam-type must be vit_b|vit_l|vit_h, got {sam_type!r}')
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'SAM checkpoint {checkpoint!r} does not exist')
    try:
        sam = sam_model_registry[sam_type](checkpoint=checkpoint)
    except Exception as e:  # wrong file, wrong size, truncated download...
        raise RuntimeError(f'cannot load SAM checkpoint {checkpoint!r} as {sam_type}: {e}') from e
    return SamSegmenter(sam.to(device).eval())


def tiny_sam(seed=0, img_size=256, dim=32):
    """A random SAM with SAM's exact architecture at toy width, for tests and benchmarks."""
    from functools import partial
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
    torch.manual_seed(seed)
    grid = img_size // 16
    enc = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=dim, depth=2, num_heads=2,
                          out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    pe = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                       input_image_size=(img_size, img_size), mask_in_chans=8)
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2), transformer_dim=dim,
        iou_head_depth=2, iou_head_hidden_dim=dim)
    return SamSegmenter(Sam(image_encoder=enc, prompt_encoder=pe, mask_decoder=dec).eval())


class ColorSegmenter:
    """The connected region of the seed pixel's colour inside the box. Score = how much of the
    box the region fills, a stand-in for SAM's predicted IoU."""

    def __init__(self, tol=12):
        self.tol, self.image, self.key, self.encoder_calls = tol, None, None, 0

    def set_image(self, image, key=None):
        if key is not None and key == self.key:
            return
        self.image, self.key, self.encoder_calls = np.asarray(image), key, self.encoder_calls + 1

    def predict_batch(self, boxes, points):
        H, W = self.image.shape[:2]
        masks, scores = np.zeros((len(boxes), H, W), bool), np.zeros(len(boxes), np.float32)
        for i, ((x1, y1, x2, y2), (px, py)) in enumerate(zip(np.asarray(boxes, int), np.asarray(points, int))):
            crop = self.image[y1:y2 + 1, x1:x2 + 1].astype(int)
            sx, sy = min(max(px, x1), x2) - x1, min(max(py, y1), y2) - y1  # seed clamped into box
            same = np.abs(crop - crop[sy, sx]).max(-1) <= self.tol
            lab, _ = ndimage.label(same)
            region = lab == lab[sy, sx]
            masks[i, y1:y2 + 1, x1:x2 + 1] = region
            scores[i] = region.mean()
        return masks, scores


def segment(segmenter, image, objects, key=None):
    """objects (original pixels; bbox_2d / point_2d may be None) -> masks (K,H,W) bool, scores (K,).
    All objects go to the decoder in one batch; an object with neither box nor point is empty."""
    H, W = image.shape[:2]
    masks, scores = np.zeros((len(objects), H, W), bool), np.zeros(len(objects), np.float32)
    boxes, points, keep = [], [], []
    for i, o in enumerate(objects):
        box, pt = o.get('bbox_2d'), o.get('point_2d')
        if box is None and pt is None:
            continue
        box = box if box is not None else [0, 0, W - 1, H - 1]             # point only: whole image
        pt = pt if pt is not None else [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]  # box centre
        boxes.append(box), points.append(pt), keep.append(i)
    if keep:
        segmenter.set_image(image, key)
        masks[keep], scores[keep] = segmenter.predict_batch(np.array(boxes), np.array(points))
    return masks, scores
