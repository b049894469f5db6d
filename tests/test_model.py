"""Tests for model.py / tiny.py / segment.py: the tiny checkpoint round trip, prompts, answer
parsing, coordinate mapping and the colour segmenter on the world (tests/test_segment.py: SAM).
Run: python -m pytest tests/test_model.py
"""
import os, time
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import model as M
import segment as S
import world

B = {'label': 'cup', 'bbox_2d': [10.0, 20.0, 30.0, 40.0], 'point_2d': [15.0, 25.0]}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = M.build_tiny_policy(str(tmp_path_factory.mktemp('tiny')), words=world.vocabulary(),
                            prompt='find: {question}')
    return d, *M.load_policy(d)


def test_round_trip_and_generation_speed(tiny):
    d, net, proc = tiny
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'prompt.txt'} <= set(os.listdir(d))
    assert net.config.model_type == 'qwen2_5_vl' and proc.tokenizer.padding_side == 'left'
    again = M.build_tiny_policy(d + '_again', words=world.vocabulary(), prompt='find: {question}')
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
    t = time.time()
    out = net.generate(**b, do_sample=True, max_new_tokens=64, num_return_sequences=4)
    assert out.shape[0] == 4 and time.time() - t < 2.0


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


PARSE_CASES = [  # (model output, expected objects or None)
    ('<think>x</think><answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}]</answer>', [B]),
    ("<answer>[{'label': 'cup', 'bbox_2d': [10,20,30,40], 'point_2d': [15,25]}]</answer>", [B]),
    ('blah <answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]},]</answer> more', [B]),
    ('<answer>{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}</answer>', [B]),
    ('<answer>[{"label": "cup", "bbox_2d": [10.0,20.0,30.0,40.0], "point_2d": [15.0,25.0]}]</answer>', [B]),
    ('<answer>```json\n[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}]\n```</answer>', [B]),
    ('<answer>[]</answer>', []),
    ('<think>nothing here</think>\n<answer> [ ] </answer>', []),
    ('<answer>[{"bbox_2d": [10,20,30,40], "point_2d": [15,25]}]</answer>', [{**B, 'label': None}]),
    ('<answer>[{"label": "cup", "point_2d": [15,25]}]</answer>', [{**B, 'bbox_2d': None}]),
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30], "point_2d": [15,25]}]</answer>', [{**B, 'bbox_2d': None}]),
    ('<answer>[{"label": "", "bbox_2d": [10,20,30,40], "point_2d": ["a", 2]}]</answer>',
     [{**B, 'label': None, 'point_2d': None}]),
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}, 7, "x"]</answer>', [B]),
    ('[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}]', [B]),  # no tags at all
    ('the answer is {"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}', [B]),
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]</answer>', None),  # truncated
    ('<answer>none</answer>', None),
    ('I cannot find it.', None),
    ('', None),
    ('<answer>[1, 2, 3]</answer>', None),
    ('<answer>[{"label": "cup", "bbox_2d": [NaN,20,30,40], "point_2d": [15,25]}]</answer>', [{**B, 'bbox_2d': None}]),
    ('<answer>[{"label": "cup", "bbox_2d": [true,20,30,40], "point_2d": [15,25]}]</answer>', [{**B, 'bbox_2d': None}]),
    ('<answer>[{"label": "  cup ", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}]</answer><answer>[]</answer>', [B]),
]


@pytest.mark.parametrize('text,expected', PARSE_CASES)
def test_parse_answer(text, expected):
    assert M.parse_answer(text) == expected


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.text(), st.builds(lambda a, b: f'<answer>{a}</answer>{b}', st.text(), st.text()),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                  st.sampled_from(['label', 'bbox_2d', 'point_2d', 'x']), c, max_size=4),
                              max_leaves=12).map(lambda v: f'<answer>{v!r}</answer>')))
def test_parse_answer_never_raises(text):
    out = M.parse_answer(text)
    assert out is None or all(set(o) == {'label', 'bbox_2d', 'point_2d'} for o in out)


def test_coordinates_both_ways_non_square():
    W, H = 1000, 500   # original; the model saw 840x840 (SPEC §3)
    objs = [{'label': 'a', 'bbox_2d': [84, 84, 420, 168], 'point_2d': [210, 126]}]
    out = M.to_original(objs, (W, H), (840, 840))
    assert out[0]['bbox_2d'] == [100, 50, 500, 100] and out[0]['point_2d'] == [250, 75]
    assert (M.to_model([100, 50, 500, 100], (W, H), (840, 840)) == [84, 84, 420, 168]).all()
    # round half up (Python's round() would give 2 and 6: banker's rounding)
    assert M.to_original([{'bbox_2d': None, 'point_2d': [1.25, 3.25]}], (200, 200), (100, 100))[0]['point_2d'] == [3, 7]
    # swapped corners, out of image, degenerate
    out = M.to_original([{'bbox_2d': [900, 900, -5, 10], 'point_2d': [-1, 9999]}], (W, H), (840, 840))[0]
    assert out['bbox_2d'] == [0, 6, 999, 499] and out['point_2d'] == [0, 499]
    out = M.to_original([{'bbox_2d': [840, 3, 840, 3], 'point_2d': None}], (W, H), (840, 840))[0]
    assert out['bbox_2d'] == [998, 2, 999, 3] and out['point_2d'] is None
    # Qwen3-VL 0-1000 grid and the reference's auto inference
    g = [{'bbox_2d': [100, 100, 500, 1000], 'point_2d': [300, 500]}]
    assert M.to_original(g, (W, H), (840, 840), 'grid1000')[0]['bbox_2d'] == [100, 50, 500, 499]
    assert M.to_original(g, (W, H), (840, 840), 'auto')[0]['bbox_2d'] == [100, 50, 500, 499]
    u = [{'bbox_2d': [0.1, 0.1, 0.5, 1.0], 'point_2d': [0.3, 0.5]}]
    assert M.to_original(u, (W, H), (840, 840), 'auto')[0]['point_2d'] == [300, 250]
    big = [{'bbox_2d': [0, 0, 1200, 1260], 'point_2d': None}]
    assert M.to_original(big, (W, H), (1260, 1260), 'auto')[0]['bbox_2d'] == [0, 0, 952, 499]
    with pytest.raises(ValueError, match='coord_mode'):
        M.to_original(g, (W, H), (840, 840), 'pixels')


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
