"""segment.py: the frozen segmenter side of StAR (method §4): box and/or point -> mask.

Every segmenter has one interface (SAM's argument names): `set_image(image, key=None)` and
`predict_batch(boxes (K,4) or None, points (K,2) or None) -> masks (K,H,W) bool, scores (K,)`,
the best of SAM's 3 multimask outputs by predicted IoU, masks at the image's own resolution.
- SamSegmenter: segment-anything (SAM v1) from a vit_b|vit_l|vit_h checkpoint FILE, or a tiny
  random SAM for tests.
- Sam2Segmenter: SAM 2 / 2.1 through transformers from a checkpoint DIRECTORY (the paper used SAM 2.1
  Hiera-L); transformers' own pre- and post-processing (1024² resize, bilinear
  upscale of the best mask). `load_segmenter(path)` picks one by the path.
  The image embedding is cached per key: the G rollouts of one prompt (and every object in them)
  share ONE encoder pass, and their prompts go through the light mask decoder in chunks of
  `chunk` (`decode_distinct`) - the reference re-encodes the image for every rollout.
- ColorSegmenter: for the synthetic world; grows the flat colour region under the point inside
  the box, like a good SAM on flat-coloured shapes.
`segment(segmenter, image, objects)` prompts each object with what it has: box and point, the
box alone, or the point alone (never an invented box or point); an object with neither is empty.
Tested by: python -m pytest tests/test_segment.py
"""
import json
import os
import numpy as np
import torch
import torch.nn.functional as F
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
        return load_sam2(path, device)
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


# --- SAM 2 / 2.1 through transformers (Sam2Model + Sam2Processor), the segmenter the paper used ---
class Sam2Segmenter:
    def __init__(self, model, processor, chunk=CHUNK):
        self.model, self.processor, self.chunk = model.eval(), processor, chunk
        self.key, self.encoder_calls, self.features, self.size = None, 0, None, None

    @torch.no_grad()
    def set_image(self, image, key=None):
        """Encode once per key; a new key (or key=None) re-encodes."""
        if key is not None and key == self.key:
            return
        weight = next(self.model.parameters())
        pixels = self.processor.image_processor(images=np.ascontiguousarray(image), return_tensors='pt')
        pixels = pixels['pixel_values'].to(weight.device, weight.dtype)            # (1, 3, 1024, 1024)
        self.features = self.model.get_image_embeddings(pixels)  # (1,32,256²), (1,64,128²), (1,256,64²)
        self.size, self.key, self.encoder_calls = image.shape[:2], key, self.encoder_calls + 1

    @torch.no_grad()
    def predict_batch(self, boxes=None, points=None):
        return decode_distinct(boxes, points, self.chunk, self._decode)

    def _decode(self, boxes, points):
        """One chunk of C prompts through the prompt encoder + mask decoder (Sam2Model.forward with
        cached embeddings), as one image with C prompts: (1, C, 1, 2) points, (1, C, 4) boxes."""
        (H, W), device = self.size, self.features[-1].device
        side = self.processor.target_size
        scale = torch.tensor([side / W, side / H], device=device)                  # fp32, as the processor
        prompts = {}
        if points is not None:
            xy = torch.as_tensor(points, dtype=torch.float32, device=device) * scale  # (C, 2)
            prompts.update(input_points=xy[None, :, None],
                           input_labels=torch.ones(1, len(xy), 1, dtype=torch.long, device=device))
        if boxes is not None:
            corners = torch.as_tensor(boxes, dtype=torch.float32, device=device).view(-1, 2, 2) * scale
            prompts['input_boxes'] = corners.view(1, -1, 4)
        out = self.model(image_embeddings=self.features, multimask_output=True, **prompts)
        low, iou = out.pred_masks[0], out.iou_scores[0]                   # (C, 3, 256, 256), (C, 3)
        rows, best = torch.arange(len(iou), device=device), iou.argmax(1)
        masks = F.interpolate(low[rows, best][:, None].float(), (H, W), mode='bilinear', align_corners=False)
        return masks[:, 0] > 0.0, iou[rows, best]


def load_sam2(path, device='cpu'):
    """A Sam2Segmenter from a transformers SAM 2 / 2.1 checkpoint directory (model_type sam2, or
    sam2_video, whose image part Sam2Model loads), with a one-line error if it is not one."""
    from transformers import Sam2Model, Sam2Processor
    try:
        with open(os.path.join(path, 'config.json')) as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError, AttributeError):
        raise ValueError(f'--sam {path!r}: a directory without a readable config.json is not a SAM 2 checkpoint')
    if model_type not in ('sam2', 'sam2_video'):
        raise ValueError(f'--sam {path!r}: config.json has model_type {model_type!r}, not a SAM 2 / 2.1 checkpoint '
                         f'(use a sam2.1-hiera-* transformers directory, or a SAM v1 .pth file)')
    try:
        model, info = Sam2Model.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        processor = Sam2Processor.from_pretrained(path)
    except Exception as e:  # missing weights file, truncated download, no processor config...
        raise RuntimeError(f'cannot load SAM 2 checkpoint {path!r}: {" ".join(str(e).split())[:300]}') from e
    if info['missing_keys']:
        raise RuntimeError(f'SAM 2 checkpoint {path!r} lacks {len(info["missing_keys"])} weights '
                           f'(e.g. {sorted(info["missing_keys"])[0]})')
    if processor.target_size != model.config.prompt_encoder_config.image_size:
        raise ValueError(f'SAM 2 checkpoint {path!r}: processor size {processor.target_size} != model image size '
                         f'{model.config.prompt_encoder_config.image_size}')
    return Sam2Segmenter(model.to(device).eval(), processor)


def hiera_l_config():
    """The Sam2Config of SAM 2.1 Hiera-L (sam2.1_hiera_l.yaml; 217M parameters in Sam2Model), for random weights."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig
    trunk = Sam2HieraDetConfig(hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
                               embed_dim_per_stage=[144, 288, 576, 1152], num_attention_heads_per_stage=[2, 4, 8, 16],
                               window_size_per_stage=[8, 4, 16, 8], global_attention_blocks=[23, 33, 43])
    vision = Sam2VisionConfig(backbone_config=trunk, backbone_channel_list=[1152, 576, 288, 144])
    return Sam2Config(vision_config=vision)


def tiny_sam2(seed=0, side=128, dim=32):
    """(Sam2Model, Sam2Processor): SAM 2's architecture at toy size for tests, random weights drawn
    wider than transformers' init so that the 3 masks and their predicted IoUs differ."""
    from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2ImageProcessor, Sam2Model, Sam2Processor,
                              Sam2VisionConfig)
    trunk = Sam2HieraDetConfig(image_size=[side, side], hidden_size=8, blocks_per_stage=[1, 1, 2, 1],
                               embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
                               window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3],
                               window_positional_embedding_background_size=[4, 4])
    levels = [[side // 4] * 2, [side // 8] * 2, [side // 16] * 2]   # the FPN levels the decoder uses
    config = Sam2Config(vision_config=Sam2VisionConfig(backbone_config=trunk, backbone_channel_list=[64, 32, 16, 8],
                                                       backbone_feature_sizes=levels, fpn_hidden_size=dim),
                        prompt_encoder_config=dict(hidden_size=dim, image_size=side),
                        mask_decoder_config=dict(hidden_size=dim, mlp_dim=2 * dim, num_attention_heads=2,
                                                 iou_head_hidden_dim=dim))
    torch.manual_seed(seed)
    model = Sam2Model(config).eval()
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, 0.1)
    return model, Sam2Processor(image_processor=Sam2ImageProcessor(size={'height': side, 'width': side}))
