"""Tests for model.py / sandbox/tiny.py: the tiny checkpoint round trip, prompts and the colour segmenter on the
world. Answer parsing and coordinates: tests/test_answer.py; SAM and SAM 2: tests/test_segment.py.
Run: python -m pytest tests/test_model.py
"""
import os
import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import segment as S
from sandbox import world
from sandbox.tiny import build_tiny_policy


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = build_tiny_policy(str(tmp_path_factory.mktemp('tiny')), words=world.vocabulary(),
                            prompt='find: {question}')
    return d, *M.load_policy(d)


def test_round_trip_and_generation(tiny):
    d, net, proc = tiny
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'prompt.txt'} <= set(os.listdir(d))
    assert net.config.model_type == 'qwen2_5_vl' and proc.tokenizer.padding_side == 'left'
    again = build_tiny_policy(d + '_again', words=world.vocabulary(), prompt='find: {question}')
    net2, _ = M.load_policy(again)
    for (n, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), f'{n}: the builder is not deterministic'
    # whole-number tokens, and decoding gives back the exact text
    ids = proc.tokenizer('[112,7,0]', add_special_tokens=False).input_ids
    assert proc.tokenizer.convert_ids_to_tokens(ids) == ['[', '112', ',', '7', ',', '0', ']']
    text = '<think>red circle</think><answer>[{"label":"red circle","bbox_2d":[1,2,3,4]}]</answer>'
    assert proc.tokenizer.decode(proc.tokenizer(text).input_ids) == text
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    b = M.make_inputs(proc, [img], [M.build_prompt('the red circle', M.load_template('stage1', d))])
    net.generate(**b, do_sample=True, max_new_tokens=4)  # warm-up
    out = net.generate(**b, do_sample=True, max_new_tokens=64, num_return_sequences=4)
    assert out.shape[0] == 4  # speed is bench/speed.py's job: a timed assert fails on a busy machine


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a directory'):
        M.load_policy(str(tmp_path / 'nope'))
    with pytest.raises(FileNotFoundError, match='no config.json'):
        M.load_policy(str(tmp_path))
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(FileNotFoundError, match='no weights'):
        M.load_policy(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        S.load_sam(str(tmp_path / 'sam.pth'), 'vit_b')
    (tmp_path / 'sam.pth').write_bytes(b'garbage')
    with pytest.raises(RuntimeError, match='sam.pth'):
        S.load_sam(str(tmp_path / 'sam.pth'), 'vit_b')
    with pytest.raises(ValueError, match='vit_b'):
        S.load_sam(str(tmp_path / 'sam.pth'), 'vit_x')


def test_prompt_building(tmp_path):
    assert M.normalize_query('  Where could I sit?"  ') == 'where could i sit'
    for name in ('stage1', 'stage2', 'eval'):
        p = M.build_prompt('The Cup.', M.TEMPLATES[name])
        assert '"the cup"' in p and '<think>' in p and '<answer>' in p and 'bbox_2d' in p
    assert 'first work out' in M.TEMPLATES['stage2'] and 'first work out' not in M.TEMPLATES['stage1']
    assert '[]' in M.TEMPLATES['eval'] and '[]</answer>' not in M.TEMPLATES['stage2']
    f = tmp_path / 'p.txt'
    f.write_text('Q: {question}')
    assert M.build_prompt('A?', M.load_template(str(f))) == 'Q: a'
    f.write_text('no placeholder')
    with pytest.raises(ValueError, match='question'):
        M.load_template(str(f))


def test_color_segmenter_on_world():
    s = world.sample('test', 3)
    seg = S.ColorSegmenter()
    objs = [{'bbox_2d': list(b), 'point_2d': list(p)} for b, p in zip(s.boxes, s.points)]
    masks, _ = S.segment(seg, s.image, objs + [{'bbox_2d': None, 'point_2d': None}])
    assert len(masks) == len(s.masks) + 1 and not masks[-1].any()
    for m, gt in zip(masks, s.masks):
        assert np.array_equal(m, gt)  # exact GT box + point -> exact mask


def test_default_image_size_never_exceeds_what_the_processor_keeps(tiny):
    """A tiny base keeps 112² pixels: an 840 input would be shrunk and its coordinates misread."""
    from transformers import Qwen2VLImageProcessor
    assert M.default_image_size(tiny[2]) == 112
    assert M.default_image_size(type('P', (), {'image_processor': Qwen2VLImageProcessor()})()) == 840
