"""Tests for segment.py (SAM v1, SAM 2, colour): the batched, chunked segmenters against one-by-one references
(segment-anything's SamPredictor.predict; transformers' documented Sam2Processor + Sam2Model usage),
prompt kinds (box + point, box alone, point alone, neither), the embedding cache, chunk invariance,
bf16, and load_segmenter's checkpoint handling. Tiny random models: nothing is downloaded.
Run: python -m pytest tests/test_segment.py
"""
import json
import numpy as np
import pytest
import torch


import segment as S

IMG = np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)  # non-square: H 80, W 100
OBJECTS = [  # every prompt kind, repeats (rollouts often agree), and an object with nothing
    {'bbox_2d': [5, 5, 50, 40], 'point_2d': [20, 20]}, {'bbox_2d': [30, 20, 90, 70], 'point_2d': [60, 50]},
    {'bbox_2d': [0, 0, 99, 79], 'point_2d': [50, 40]}, {'bbox_2d': [5, 5, 50, 40], 'point_2d': [20, 20]},
    {'bbox_2d': [10, 30, 70, 75], 'point_2d': None}, {'bbox_2d': [60, 0, 99, 40], 'point_2d': None},
    {'bbox_2d': None, 'point_2d': [15, 60]}, {'bbox_2d': None, 'point_2d': [80, 10]},
    {'bbox_2d': None, 'point_2d': None}, {'bbox_2d': [10, 30, 70, 75], 'point_2d': None},
    {'bbox_2d': [2, 50, 40, 79], 'point_2d': [30, 70]}, {'bbox_2d': None, 'point_2d': [45, 45]},
]


@pytest.fixture(scope='module')
def sam2_dir(tmp_path_factory):
    """A tiny random SAM 2 saved like a real transformers checkpoint (config, weights, processor)."""
    d = tmp_path_factory.mktemp('sam2')
    model, processor = S.tiny_sam2(seed=1)  # a seed whose best of 3 varies between OBJECTS' prompts
    model.save_pretrained(d), processor.save_pretrained(d)
    return str(d)


def sam_reference(seg, obj):
    """segment-anything's own one-object call, with only what the object has."""
    kw = {} if obj['bbox_2d'] is None else {'box': np.array(obj['bbox_2d'], float)}
    if obj['point_2d'] is not None:
        kw.update(point_coords=np.array([obj['point_2d']], float), point_labels=np.array([1]))
    masks, scores, _ = seg.predictor.predict(multimask_output=True, **kw)
    return masks[scores.argmax()], scores.max(), scores.argmax()


def sam2_reference(model, processor, image, obj):
    """transformers' documented SAM 2 usage for one object: processor -> Sam2Model (pixel values, so
    a fresh encode) -> processor.post_process_masks, then the best of 3 by predicted IoU."""
    kw = {} if obj['bbox_2d'] is None else {'input_boxes': [[obj['bbox_2d']]]}
    if obj['point_2d'] is not None:
        kw.update(input_points=[[[obj['point_2d']]]], input_labels=[[[1]]])
    inputs = processor(images=image, return_tensors='pt', **kw)
    with torch.no_grad():
        out = model(**inputs)
    masks = processor.post_process_masks(out.pred_masks, inputs['original_sizes'])[0][0]  # (3, H, W) bool
    iou = out.iou_scores[0, 0]
    return masks[iou.argmax()].numpy(), float(iou.max()), int(iou.argmax())


@pytest.mark.parametrize('which', ['sam', 'sam2'])
def test_batched_equals_one_by_one_for_every_prompt_kind(which, sam2_dir):
    """segment() (one decoder batch per prompt kind, chunks of 5) == the library's own one-object call
    with what the object has: never an invented whole-image box or box-centre point."""
    if which == 'sam':
        seg = S.tiny_sam(seed=3)  # a seed whose best of 3 varies between these prompts
        seg.set_image(IMG)
        reference = lambda o: sam_reference(seg, o)
    else:
        seg = S.load_segmenter(sam2_dir)
        assert isinstance(seg, S.Sam2Segmenter)
        reference = lambda o: sam2_reference(seg.model, seg.processor, IMG, o)
    seg.chunk = 5
    masks, scores = S.segment(seg, IMG, OBJECTS, key='img')
    assert masks.shape == (len(OBJECTS), 80, 100) and masks.dtype == bool and scores.dtype == np.float32
    best = []
    for k, obj in enumerate(OBJECTS):
        if obj['bbox_2d'] is None and obj['point_2d'] is None:
            assert not masks[k].any() and scores[k] == 0
            continue
        mask, score, index = reference(obj)
        assert np.array_equal(masks[k], mask) and np.isclose(scores[k], score, atol=1e-5), (which, k)
        best.append(index)
    assert len(set(best)) > 1  # the best of 3 is not always the same output: the choice is tested
    assert all(0 < m.sum() < m.size for m in masks[scores > 0])  # masks are neither empty nor full


@pytest.mark.parametrize('which', ['sam', 'sam2'])
def test_chunk_size_changes_nothing_and_repeats_decode_once(which, monkeypatch):
    seg = S.tiny_sam() if which == 'sam' else S.Sam2Segmenter(*S.tiny_sam2())
    seg.set_image(IMG, key='a')
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 40, (7, 2))
    boxes, points = np.concatenate([xy, xy + rng.integers(20, 40, (7, 2))], 1), xy + 10  # 7 distinct prompts
    boxes, points = boxes[[0, 1, 2, 3, 4, 5, 6, 0, 3, 6]], points[[0, 1, 2, 3, 4, 5, 6, 0, 3, 6]]  # 10, 3 repeats
    sizes, decode = [], seg._decode
    def spy(b, p):
        masks, scores = decode(b, p)
        assert masks.dtype == torch.bool  # thresholded before it leaves the device
        sizes.append(len(masks))
        return masks, scores
    monkeypatch.setattr(seg, '_decode', spy)
    results = {}
    for chunk in (1, 3, 64):
        seg.chunk = chunk
        results[chunk] = seg.predict_batch(boxes, points)
    assert sizes == [1] * 7 + [3, 3, 1] + [7]
    for chunk in (1, 3):
        assert np.array_equal(results[chunk][0], results[64][0])
        np.testing.assert_allclose(results[chunk][1], results[64][1], atol=1e-6)
    assert np.array_equal(results[64][0][7], results[64][0][0])


def test_only_the_best_mask_is_upscaled(monkeypatch):
    seg = S.tiny_sam()
    seg.set_image(IMG)
    shapes, post = [], seg.predictor.model.postprocess_masks
    monkeypatch.setattr(seg.predictor.model, 'postprocess_masks', lambda m, *a: shapes.append(m.shape) or post(m, *a))
    seg.predict_batch(np.array([[5, 5, 50, 40], [30, 20, 90, 70]]), None)
    assert [s[:2] for s in shapes] == [(2, 1)]


@pytest.mark.parametrize('make', [S.tiny_sam, lambda: S.Sam2Segmenter(*S.tiny_sam2()), S.ColorSegmenter])
def test_embedding_cache_one_encode_for_16_rollouts(make):
    seg, img = make(), np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    objs = [{'bbox_2d': [10, 10, 60, 50], 'point_2d': [30, 30]}, {'bbox_2d': [70, 20, 120, 90], 'point_2d': None},
            {'bbox_2d': None, 'point_2d': [5, 80]}]
    for rollout in range(16):
        masks, scores = S.segment(seg, img, objs, key='img-0')
    assert seg.encoder_calls == 1 and masks.shape == (3, 96, 128) and scores.shape == (3,)
    S.segment(seg, img, objs, key='img-1')
    assert seg.encoder_calls == 2


def test_sam2_runs_in_the_models_dtype():
    """A bf16 model gets bf16 pixels and prompts from the segmenter (a hard-coded dtype would raise);
    masks stay bool at the image size and agree with fp32 almost everywhere."""
    model, processor = S.tiny_sam2()
    full = S.Sam2Segmenter(model, processor)
    half = S.Sam2Segmenter(S.tiny_sam2()[0].to(torch.bfloat16), processor)
    objs = [o for o in OBJECTS if o['bbox_2d'] is not None or o['point_2d'] is not None]
    (m32, s32), (m16, s16) = S.segment(full, IMG, objs), S.segment(half, IMG, objs)
    assert m16.dtype == bool and m16.shape == m32.shape and s16.dtype == np.float32
    assert (m16 == m32).mean() > 0.9 and np.abs(s16 - s32).max() < 0.05


def test_load_segmenter_file_or_directory(tmp_path, sam2_dir):
    with pytest.raises(FileNotFoundError, match='nope'):
        S.load_segmenter(str(tmp_path / 'nope'))
    (tmp_path / 'sam.pth').write_bytes(b'garbage')
    with pytest.raises(RuntimeError, match='sam.pth'):
        S.load_segmenter(str(tmp_path / 'sam.pth'), 'vit_b')
    (tmp_path / 'sam2.1_hiera_large.pt').write_bytes(b'a facebookresearch/sam2 checkpoint')
    with pytest.raises(ValueError, match='transformers checkpoint directory'):
        S.load_segmenter(str(tmp_path / 'sam2.1_hiera_large.pt'))
    d = tmp_path / 'dir'
    d.mkdir()
    with pytest.raises(ValueError, match='config.json'):
        S.load_segmenter(str(d))
    (d / 'config.json').write_text(json.dumps({'model_type': 'qwen2_5_vl'}))
    with pytest.raises(ValueError, match="'qwen2_5_vl', not a SAM 2"):
        S.load_segmenter(str(d))
    (d / 'config.json').write_text(open(f'{sam2_dir}/config.json').read())  # a SAM 2 config, no weights
    with pytest.raises(RuntimeError, match='cannot load SAM 2'):
        S.load_segmenter(str(d))
    from safetensors.torch import load_file, save_file
    weights = load_file(f'{sam2_dir}/model.safetensors')
    save_file({k: v for k, v in weights.items() if 'iou_prediction_head' not in k}, d / 'model.safetensors')
    (d / 'processor_config.json').write_text(open(f'{sam2_dir}/processor_config.json').read())
    with pytest.raises(RuntimeError, match='lacks .* weights'):  # transformers alone would only warn
        S.load_segmenter(str(d))
    seg = S.load_segmenter(sam2_dir)
    assert next(seg.model.parameters()).dtype == torch.float32
    for name, weight in S.tiny_sam2(seed=1)[0].state_dict().items():  # the saved weights, not a fresh init
        assert torch.equal(seg.model.state_dict()[name], weight), name


def test_load_segmenter_takes_a_sam2_video_checkpoint(tmp_path):
    """Hub SAM 2.1 directories may be saved as Sam2VideoModel: its image part loads, every weight."""
    from transformers import Sam2VideoConfig, Sam2VideoModel
    model, processor = S.tiny_sam2()
    c = model.config
    video = Sam2VideoModel(Sam2VideoConfig(vision_config=c.vision_config,
                                           prompt_encoder_config=c.prompt_encoder_config.to_dict(),
                                           mask_decoder_config=c.mask_decoder_config.to_dict()))
    video.save_pretrained(tmp_path), processor.save_pretrained(tmp_path)
    seg, saved = S.load_segmenter(str(tmp_path)), video.state_dict()
    assert all(torch.equal(w, saved[name]) for name, w in seg.model.state_dict().items())
