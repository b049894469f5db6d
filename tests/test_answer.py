"""Tests for answer.py (method §2-3): parsing what models really write (repairs, "no object" items,
the 120-object cap), and mapping coordinates back (Qwen2.5-VL pixels, Qwen3-VL grids, huge values).
Each expectation is computed by hand in the comment beside it. Fuzzing and timing: tests/test_fuzz.py.
Run: python -m pytest -q tests/test_answer.py
"""
import json, math, re
import pytest
from hypothesis import given, settings, strategies as st

import answer
import model as M

B = {'label': 'cup', 'bbox_2d': [10.0, 20.0, 30.0, 40.0], 'point_2d': [15.0, 25.0]}
C = {'label': 'mug', 'bbox_2d': [50.0, 20.0, 70.0, 40.0], 'point_2d': [60.0, 30.0]}
OBJ_B = '{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}'
OBJ_C = '{"label": "mug", "bbox_2d": [50,20,70,40], "point_2d": [60,30]}'

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
    # items with neither a valid box nor a valid point are not objects (method §2)
    ('<answer>[{}]</answer>', []),
    ('<answer>{}</answer>', []),
    ('<answer>[{"label": "cup"}]</answer>', []),
    ('<answer>[{"label": "cup", "bbox_2d": [1, 2, 3], "point_2d": "here"}]</answer>', []),
    ('<answer>[7, {}]</answer>', []),                                 # a dict item: an answer, no object
    (f'<answer>[{OBJ_B}, {{}}]</answer>', [B]),                       # a {} beside objects is dropped
    (f'<answer>[{{}}, {OBJ_B}, {{}}, {OBJ_C}]</answer>', [B, C]),
    # the reference's two repairs, then the usual tolerance
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25}}]</answer>', [B]),
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15, 25 } ]</answer>', [B]),
    (f'<answer>[{OBJ_B[:-2]}}}}}, {OBJ_C}]</answer>', [B, C]),          # [15,25}}, {...}]: mid-list
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40]", "point_2d": [15,25]}]</answer>', [B]),
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40], "point_2d": [15,25]"}]</answer>', [B]),
    ('<answer>[{"label": "cup", "bbox_2d": [10,20,30,40]", "point_2d": [15,25}},]</answer>', [B]),  # all
    ("<answer>[{'label': 'cup', 'bbox_2d': [10,20,30,40], 'point_2d': [15,25}}]</answer>", [B]),
    # repairs only run on what does not parse: a label that looks like the typo is kept as written
    ('<answer>[{"label": "\\"point_2d\\": [1, 2}}", "bbox_2d": [10,20,30,40], "point_2d": [15,25]}]</answer>',
     [{**B, 'label': '"point_2d": [1, 2}}'}]),
    # huge numbers: 1e308 is a finite number, 1e309 is inf, an int past 1e308 is no float
    ('<answer>[{"label": "cup", "bbox_2d": [1e308,20,30,40], "point_2d": [1e309,25]}]</answer>',
     [{**B, 'bbox_2d': [1e308, 20.0, 30.0, 40.0], 'point_2d': None}]),
    (f'<answer>[{{"label": "cup", "bbox_2d": [{10 ** 400},20,30,40], "point_2d": [15,25]}}]</answer>',
     [{**B, 'bbox_2d': None}]),
]


@pytest.mark.parametrize('text,expected', PARSE_CASES)
def test_parse_answer(text, expected):
    assert M.parse_answer(text) == expected


def test_only_the_first_120_objects_count():
    objs = [{'label': str(k), 'bbox_2d': [k, k, k + 5, k + 5], 'point_2d': [k + 1, k + 1]} for k in range(125)]
    out = M.parse_answer(f'<answer>{json.dumps([{}] * 5 + objs)}</answer>')  # the {} are no objects
    assert answer.MAX_OBJECTS == 120 and [o['label'] for o in out] == [str(k) for k in range(120)]
    assert M.parse_answer(f'<answer>{json.dumps(objs[:120])}</answer>') == out


_TOKENS = ['<answer>', '</answer>', '<answer', 'answer>', '</', 'x', '\n']


@settings(max_examples=1000, derandomize=True, database=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=10).map(''.join))
def test_answer_block_equals_the_lazy_regex(text):
    m = re.search(r'<answer>(.*?)</answer>', text, re.S)
    assert answer.answer_block(text) == (m.group(1) if m else None)


def test_coordinates_both_ways_non_square():
    W, H = 1000, 500   # original; the model saw 840x840 (method §3)
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
    # Qwen3-VL 0-1000 grid and the reference's auto inference: round(v * (side - 1) / 1000), so
    # x 100 -> 99.9 -> 100, 500 -> 499.5 -> 500 (half to even); y 100 -> 49.9 -> 50, 1000 -> 499
    g = [{'bbox_2d': [100, 100, 500, 1000], 'point_2d': [300, 500]}]
    assert M.to_original(g, (W, H), (840, 840), 'grid1000')[0]['bbox_2d'] == [100, 50, 500, 499]
    assert M.to_original(g, (W, H), (840, 840), 'auto')[0]['bbox_2d'] == [100, 50, 500, 499]
    u = [{'bbox_2d': [0.1, 0.1, 0.5, 1.0], 'point_2d': [0.3, 0.5]}]  # 0.3 * 999 = 299.7, 0.5 * 499 = 249.5
    assert M.to_original(u, (W, H), (840, 840), 'auto')[0]['point_2d'] == [300, 250]
    big = [{'bbox_2d': [0, 0, 1200, 1260], 'point_2d': None}]  # > 1000.5: pixels of the 1260 input
    assert M.to_original(big, (W, H), (1260, 1260), 'auto')[0]['bbox_2d'] == [0, 0, 952, 499]
    with pytest.raises(ValueError, match='coord_mode'):
        M.to_original(g, (W, H), (840, 840), 'pixels')


def test_qwen3_grids_and_their_inference():
    W, H, inp = 2000, 1000, (840, 840)
    place = lambda box, pt, mode='auto': M.to_original([{'bbox_2d': box, 'point_2d': pt}], (W, H), inp, mode)[0]
    # largest |v| 999 <= 999.5: the 0-999 grid. x2 999*1999/999 = 1999, y2 999*999/999 = 999,
    # point 500*1999/999 = 1000.5005 -> 1001, 250*999/999 = 250
    assert place([0, 0, 999, 999], [500, 250]) == {'bbox_2d': [0, 0, 1999, 999], 'point_2d': [1001, 250]}
    # forced 0-1000 grid: 999*1999/1000 = 1997.001 -> 1997, 999*999/1000 = 998.001 -> 998,
    # 500*1999/1000 = 999.5 -> 1000 (half to even), 250*999/1000 = 249.75 -> 250
    assert place([0, 0, 999, 999], [500, 250], 'grid1000') == {'bbox_2d': [0, 0, 1997, 998],
                                                                 'point_2d': [1000, 250]}
    # the thresholds, on the largest |value|
    assert place(None, [1.2, 0.6])['point_2d'] == [1999, 599]       # unit: 2398.8 -> 1999, 599.4
    assert place(None, [1.21, 0.6])['point_2d'] == [2, 1]           # 0-999: 2.42, 0.6
    assert place(None, [999.5, 0])['point_2d'] == [1999, 0]         # 0-999: 2000.0005 -> 1999
    assert place(None, [999.51, 0])['point_2d'] == [1998, 0]        # 0-1000: 1998.02
    assert place(None, [1000.5, 500])['point_2d'] == [1999, 500]    # 0-1000: 2000.0, 499.5 -> 500
    assert place(None, [1000.51, 500])['point_2d'] == [1999, 595]   # pixels: 500*1000/840 = 595.2
    assert place([-2000, 0, 5, 5], [5, 5])['point_2d'] == [12, 6]   # |-2000|: pixels, 5*2000/840 = 11.9
    # Python's round is half to even: 0.5 * (6 - 1) = 2.5 -> 2, 250 * (3 - 1) / 1000 = 0.5 -> 0
    assert M.to_original([{'bbox_2d': None, 'point_2d': [0.5, 0.5]}], (6, 4), inp, 'unit')[0]['point_2d'] == [2, 2]
    pts = [{'bbox_2d': None, 'point_2d': [250, 750]}]
    assert M.to_original(pts, (3, 3), inp, 'grid1000')[0]['point_2d'] == [0, 2]  # 0.5 -> 0, 1.5 -> 2


@pytest.mark.parametrize('mode', ['pixel', 'grid1000', 'unit', 'auto'])
def test_huge_values_never_raise(mode):
    W, H = 4000, 3000
    issue = [{'label': 'a', 'bbox_2d': [1e308, 0, 1, 1], 'point_2d': [0, 0]}]  # raised OverflowError
    out = M.to_original(issue, (W, H), (840, 840), mode)[0]
    if mode in ('pixel', 'auto'):  # pixels: 1e308 -> 3999; 1 * 4000/840 = 4.8 -> 5; 1 * 3000/840 = 3.6 -> 4
        assert out['bbox_2d'] == [5, 0, 3999, 4] and out['point_2d'] == [0, 0]
    for v in (math.inf, -math.inf, float('1e309'), 10 ** 400, -10 ** 400, -1e308, math.nan):
        out = M.to_original([{'bbox_2d': [v, v, 1, 1], 'point_2d': [v, 1]}], (W, H), (840, 840), mode)[0]
        x1, y1, x2, y2 = out['bbox_2d']
        assert 0 <= x1 < x2 <= W - 1 and 0 <= y1 < y2 <= H - 1 and 0 <= out['point_2d'][0] <= W - 1
        big = v == v and v > 0  # +inf and +huge clamp to the far edge, the rest to 0
        assert out['point_2d'][0] == (W - 1 if big else 0)


def test_missing_fields_stay_none_and_tiny_images():
    objs = [{'label': 'a', 'bbox_2d': None, 'point_2d': [3, 3]},
            {'label': 'b', 'bbox_2d': [1, 1, 4, 4], 'point_2d': None}]
    for mode in ('pixel', 'grid1000', 'unit', 'auto'):
        out = M.to_original(objs, (10, 10), (10, 10), mode)
        assert out[0]['bbox_2d'] is None and out[1]['point_2d'] is None and out[0]['label'] == 'a'
    # a 1-pixel-wide image cannot hold a 2-pixel box: x stays 0..0, y widens to 0..1
    out = M.to_original([{'bbox_2d': [0, 0, 0, 0], 'point_2d': [0, 0]}], (1, 5), (1, 5))[0]
    assert out['bbox_2d'] == [0, 0, 0, 1]
