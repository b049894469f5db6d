"""sam2.py: SAM 2 / 2.1 through transformers (Sam2Model + Sam2Processor), the segmenter the paper
used (SAM 2.1 Hiera-L, method §4), behind segment.py's interface: set_image(image, key) encodes
once per key; predict_batch(boxes, points) decodes all prompts in chunks, best of 3 by predicted IoU.

Pre- and post-processing are transformers' own: the image processor resizes to 1024² (aspect not
kept) and normalises with ImageNet mean/std; prompts are scaled by 1024/W and 1024/H
(Sam2Processor); the best 256² low-res mask is upscaled bilinearly to (H, W) and thresholded at 0
(Sam2Processor.post_process_masks, which we apply to the best mask only). dtype and device come from
the model. Loaded from a local checkpoint directory (segment.load_segmenter); nothing is downloaded.
Tested by: python -m pytest tests/test_segment.py
"""
import json
import os
import numpy as np
import torch
import torch.nn.functional as F

import segment


class Sam2Segmenter:
    def __init__(self, model, processor, chunk=segment.CHUNK):
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
        return segment.decode_distinct(boxes, points, self.chunk, self._decode)

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
