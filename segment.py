"""segment.py: the frozen segmenter side of StAR (method §4): box and/or point -> mask.

Every segmenter has one interface (SAM's argument names): `set_image(image, key=None)` and
`predict_batch(boxes (K,4) or None, points (K,2) or None) -> masks (K,H,W) bool, scores (K,)`,
the best of SAM's 3 multimask outputs by predicted IoU, masks at the image's own resolution.
- SamSegmenter: segment-anything (SAM v1) from a vit_b|vit_l|vit_h checkpoint FILE, or a tiny
  random SAM for tests. sam2.Sam2Segmenter: SAM 2 / 2.1 through transformers from a checkpoint
  DIRECTORY (the paper used SAM 2.1 Hiera-L). `load_segmenter(path)` picks one by the path.
  The image embedding is cached per key: the G rollouts of one prompt (and every object in them)
  share ONE encoder pass, and their prompts go through the light mask decoder in chunks of
  `chunk` (`decode_distinct`) - the reference re-encodes the image for every rollout.
- ColorSegmenter: for the synthetic world; grows the flat colour region under the point inside
  the box, like a good SAM on flat-coloured shapes.
`segment(segmenter, image, objects)` prompts each object with what it has: box and point, the
box alone, or the point alone (never an invented box or point); an object with neither is empty.
Tested by: python -m pytest tests/test_segment.py
"""
import os
import numpy as np
import torch
from scipy import ndimage

# Prompts per mask-decoder call. The decoder copies the image embedding (SAM 2 also its two
# high-resolution feature maps) once per prompt, and each chunk's best masks are upscaled to the
# image size before thresholding. Measured (CPU profiler, fp32, 2048x2048 image, real decoder
# sizes): one chunk of 64 peaks at 1.8 GB (SAM v1) / 2.6 GB (SAM 2.1) beside the model, small next
# to the 7B policy's 15.5 GB on an 80 GB GPU. Not timed on a GPU yet; set `segmenter.chunk` to change.
CHUNK = 64


def decode_distinct(boxes, points, chunk, decode):
    """The batching both SAM segmenters share. Identical prompts (rollouts often agree) are decoded
    once, in chunks of `chunk`; decode(boxes (C,4) | None, points (C,2) | None) runs on the model's
    device and returns (masks (C,H,W) bool tensor, scores (C,) tensor): only bool masks are copied
    to the host. -> masks (K,H,W) bool, scores (K,) float32 numpy, in the order of the prompts."""
    if boxes is None and points is None:
        raise ValueError('predict_batch needs boxes, points or both')
    parts = [np.asarray(a, np.float64).reshape(-1, n) for a, n in ((boxes, 4), (points, 2)) if a is not None]
    distinct, inverse = np.unique(np.concatenate(parts, 1), axis=0, return_inverse=True)  # (U, 4|2|6)
    masks, scores = [], []
    for i in range(0, len(distinct), chunk):
        part = distinct[i:i + chunk]
        m, s = decode(part[:, :4] if boxes is not None else None, part[:, -2:] if points is not None else None)
        masks.append(m.cpu().numpy()), scores.append(s.float().cpu().numpy())
    inverse = inverse.reshape(-1)
    return np.concatenate(masks)[inverse], np.concatenate(scores)[inverse]


class SamSegmenter:
    def __init__(self, sam, chunk=CHUNK):
        from segment_anything import SamPredictor
        self.predictor, self.chunk = SamPredictor(sam), chunk
        self.key, self.encoder_calls = None, 0

    def set_image(self, image, key=None):
        """Encode once per key; a new key (or key=None) re-encodes."""
        if key is not None and key == self.key:
            return
        self.predictor.set_image(np.ascontiguousarray(image))  # (H, W, 3) uint8 RGB
        self.key, self.encoder_calls = key, self.encoder_calls + 1

    @torch.no_grad()
    def predict_batch(self, boxes=None, points=None):
        return decode_distinct(boxes, points, self.chunk, self._decode)

    def _decode(self, boxes, points):
        """SamPredictor.predict_torch's steps on one chunk, upscaling only the best of the 3 masks.
        segment-anything computes coordinates in fp32 whatever the weights, so fp32 here."""
        p, sam = self.predictor, self.predictor.model
        to_device = lambda a: torch.as_tensor(a, dtype=torch.float, device=p.device)
        box = None if boxes is None else to_device(p.transform.apply_boxes(boxes, p.original_size))  # (C, 4)
        pts = None if points is None else (to_device(p.transform.apply_coords(points[:, None], p.original_size)),
                                           torch.ones(len(points), 1, device=p.device))  # foreground, (C, 1)
        sparse, dense = sam.prompt_encoder(points=pts, boxes=box, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=p.features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True)                     # (C, 3, 256, 256), (C, 3)
        rows, best = torch.arange(len(iou), device=p.device), iou.argmax(1)
        masks = sam.postprocess_masks(low[rows, best][:, None], p.input_size, p.original_size)[:, 0]
        return masks > sam.mask_threshold, iou[rows, best]


def load_sam(checkpoint, sam_type='vit_h', device='cpu'):
    """A SamSegmenter from a segment-anything checkpoint file, with a clear error if unusable."""
    from segment_anything import sam_model_registry
    if sam_type not in sam_model_registry or sam_type == 'default':
        raise ValueError(f'--sam-type must be vit_b|vit_l|vit_h, got {sam_type!r}')
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'SAM checkpoint {checkpoint!r} does not exist')
    try:
        sam = sam_model_registry[sam_type](checkpoint=checkpoint)
    except Exception as e:  # wrong file, wrong size, truncated download... on one line: state-dict errors are long
        raise RuntimeError(f'cannot load SAM checkpoint {checkpoint!r} as {sam_type} (wrong file or --sam-type?): '
                           f'{" ".join(str(e).split())[:300]}') from e
    return SamSegmenter(sam.to(device).eval())


def load_segmenter(path, sam_type='vit_h', device='cpu'):
    """--sam PATH -> a segmenter. A FILE is a segment-anything (SAM v1) checkpoint of `sam_type`;
    a DIRECTORY is a transformers SAM 2 / 2.1 checkpoint (config.json + weights + processor config),
    e.g. the paper's SAM 2.1 Hiera-L. Nothing is downloaded. fp32 weights, as the reference keeps them."""
    if os.path.isdir(path):
        import sam2
        return sam2.load_sam2(path, device)
    if not os.path.exists(path):
        raise FileNotFoundError(f'--sam {path!r} does not exist (a SAM v1 .pth file or a SAM 2 checkpoint directory)')
    if 'sam2' in os.path.basename(path).lower():  # e.g. sam2.1_hiera_large.pt from facebookresearch/sam2
        raise ValueError(f'--sam {path!r}: SAM 2 loads from a transformers checkpoint directory '
                         '(e.g. facebook/sam2.1-hiera-large), not from a .pt file')
    return load_sam(path, sam_type, device)


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
    box the region fills, a stand-in for SAM's predicted IoU. A point alone grows in the whole
    image; a box alone is seeded at its centre (this segmenter's stand-ins for SAM's answers)."""

    def __init__(self, tol=12):
        self.tol, self.image, self.key, self.encoder_calls = tol, None, None, 0

    def set_image(self, image, key=None):
        if key is not None and key == self.key:
            return
        self.image, self.key, self.encoder_calls = np.asarray(image), key, self.encoder_calls + 1

    def predict_batch(self, boxes=None, points=None):
        H, W = self.image.shape[:2]
        n = len(boxes if boxes is not None else points)
        boxes = np.tile([0, 0, W - 1, H - 1], (n, 1)) if boxes is None else np.asarray(boxes, float)
        points = (boxes[:, :2] + boxes[:, 2:]) / 2 if points is None else points
        masks, scores = np.zeros((n, H, W), bool), np.zeros(n, np.float32)
        for i, ((x1, y1, x2, y2), (px, py)) in enumerate(zip(boxes.astype(int), np.asarray(points, int))):
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
    One predict_batch per prompt kind (box + point, box alone, point alone), one image encode; an
    object with neither box nor point is an empty mask with score 0."""
    H, W = image.shape[:2]
    masks, scores = np.zeros((len(objects), H, W), bool), np.zeros(len(objects), np.float32)
    kinds = {}  # (has box, has point) -> object indices
    for i, o in enumerate(objects):
        kind = (o.get('bbox_2d') is not None, o.get('point_2d') is not None)
        if any(kind):
            kinds.setdefault(kind, []).append(i)
    if kinds:
        segmenter.set_image(image, key)
    for (has_box, has_point), idx in kinds.items():
        boxes = np.array([objects[i]['bbox_2d'] for i in idx], float) if has_box else None
        points = np.array([objects[i]['point_2d'] for i in idx], float) if has_point else None
        masks[idx], scores[idx] = segmenter.predict_batch(boxes, points)
    return masks, scores
