"""Fuzz and timing tests for what a model may write (method §2, §3, §5): nothing raises,
every reward stays in range, and no call takes more than 50 ms of CPU time on any text up to 200,000
characters (a degenerate 2,048-token rollout must not stall a training step).
- 20,000 generated answers (near-valid structures with typos, huge numbers, nested junk, unclosed or
  repeated tags, raw garbage) through answer.parse_answer, rewards.reward and rewards.score_group.
- hand-built worst cases for every regex and decoding attempt, at 200,000 characters.
Times are this thread's CPU time (time.thread_time) with the garbage collector paused, so a busy
machine or another test's garbage does not count. Derandomized: CI sees the same examples every run.
Run: python -m pytest -q tests/test_fuzz.py
"""
import gc, json, random, time
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import answer as A
import data
import rewards as R
import segment

LIMIT = 0.05  # seconds of CPU time for one call
MODES = ['pixel', 'grid1000', 'unit', 'auto']
H, W, INPUT = 24, 32, (16, 12)  # original image; the model's input (pixel coordinates x2)


def cpu_time(fn, *args):
    """-> (fn(*args), CPU seconds of this thread), without garbage-collector pauses."""
    gc.disable()
    try:
        start = time.thread_time()
        out = fn(*args)
        return out, time.thread_time() - start
    finally:
        gc.enable()


def _sample(k):
    """A crafted 24x32 sample with k GT objects (flat colour patches, exact boxes and points)."""
    img = np.zeros((H, W, 3), np.uint8)
    boxes = [[2, 3, 9, 12], [15, 6, 28, 20]][:k]
    masks = np.zeros((k, H, W), bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        img[y1:y2 + 1, x1:x2 + 1] = (200, 40 * i, 90)
        masks[i, y1:y2 + 1, x1:x2 + 1] = True
    return data.Sample(id=f'fuzz{k}', image=img, query='q', masks=masks, boxes=np.array(boxes, float).reshape(-1, 4),
                       points=np.array([[(b[0] + b[2]) // 2, (b[1] + b[3]) // 2] for b in boxes], float).reshape(-1, 2))


SAMPLES, SEG = [_sample(k) for k in range(3)], segment.ColorSegmenter()

# ----------------------------------------------------------------------------- generated answers
_num = st.one_of(st.integers(-50, 1100), st.integers(0, 40), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from([1e308, -1e308, 1e-300, 0.5, 1.2, 999.5, 1000.5, 1000.51, 10 ** 400, -10 ** 30]))
_junk = st.recursive(st.one_of(st.none(), st.booleans(), _num, st.text(max_size=6)),
                     lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=4), c, max_size=3)),
                     max_leaves=10)


def _coords(n):  # mostly the right length
    return st.one_of(*[st.lists(_num, min_size=n, max_size=n)] * 3, st.lists(_num, max_size=5), _junk)


_label = st.one_of(st.sampled_from(['cup', ' a b ', '']), st.text(max_size=8), _junk)
_obj = st.one_of(*[st.fixed_dictionaries({'label': _label, 'bbox_2d': _coords(4), 'point_2d': _coords(2)})] * 2,
                 st.fixed_dictionaries({}, optional={'label': _label, 'bbox_2d': _coords(4), 'point_2d': _coords(2),
                                                     'x': _junk}))
_many = st.builds(lambda o, n, rare: [o] * (n if rare == 0 else 2), _obj, st.integers(118, 124),
                  st.integers(0, 7))  # 1 in 8: around the 120-object cap (long answers are slow to score)
_value = st.one_of(st.lists(_obj, max_size=5), _obj, _many, _junk, st.just([{}]), st.just({}))


def _dump(value, python):
    try:
        return repr(value) if python else json.dumps(value)
    except (TypeError, ValueError):  # e.g. dict keys json cannot write
        return repr(value)


def _typo(text, kind, at):
    """The typos models make: a list closed by a brace, a stray quote, a trailing comma, a cut."""
    if kind == 'brace':
        return text.replace(']}', '}}', 1)
    if kind == 'quote':
        return text.replace(']', ']"', 1)
    if kind == 'comma':
        return text.replace('}]', '},]', 1)
    if kind == 'cut':
        return text[:int(at * len(text))]
    if kind == 'fence':
        return f'```json\n{text}\n```'
    return text


_structured = st.builds(
    lambda value, python, kind, at, think, gap, tail, wrap: wrap.format(
        think=think, gap=gap, answer=_typo(_dump(value, python), kind, at), tail=tail),
    _value, st.booleans(), st.sampled_from(['none', 'brace', 'quote', 'comma', 'cut', 'fence']),
    st.floats(0, 1), st.sampled_from(['', 'look. look. look', 'a <answer> b', '</think>']) | st.text(max_size=8),
    st.sampled_from(['', ' ', '\n', '\u2003']), st.sampled_from(['', ' ', '.', 'x', '</answer>', '<answer>']),
    st.sampled_from(['<think>{think}</think>{gap}<answer>{answer}</answer>{tail}',
                     '{gap}<think>{think}</think><answer>{answer}</answer>{gap}', '<answer>{answer}</answer>',
                     '<think>{think}<answer>{answer}', '{think} {answer}', '<answer>{answer}<answer>{tail}</answer>',
                     '<think>{think}</think>{gap}<answer>{answer}</answer></answer>{tail}']))
_TOKENS = ['<think>', '</think>', '<answer>', '</answer>', '[', ']', '{', '}', '"bbox_2d": [', "'point_2d': [",
           '"label": "a"', ',', ':', '1e309', '12', '-3.5', '"', "'", ' ', '\n', '.', 'NaN', '{}', '```', 'x']
_soup = st.lists(st.sampled_from(_TOKENS), max_size=40).map(''.join)
TEXTS = st.one_of(_structured, _structured, _structured, _soup, st.text(max_size=60))


GROUP = 8  # answers per example, scored as one group the way training scores a prompt's rollouts


@settings(max_examples=20_000 // GROUP, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(texts=st.lists(TEXTS, min_size=GROUP, max_size=GROUP), k=st.integers(0, 2), stage=st.sampled_from([1, 2]),
       mode=st.sampled_from(MODES))
def test_fuzz_20000_answers(texts, k, stage, mode):
    sample, single = SAMPLES[k], []
    for text in texts:
        objs, took = cpu_time(A.parse_answer, text)
        assert took <= LIMIT, f'parse_answer took {took * 1e3:.0f} ms'
        if objs is not None:  # objects have a box or a point; at most 120
            assert len(objs) <= A.MAX_OBJECTS
            assert all(set(o) == {'label', 'bbox_2d', 'point_2d'} and (o['bbox_2d'] or o['point_2d']) for o in objs)
            objs = A.to_original(objs, (W, H), INPUT, mode)
            for o in objs:  # integer pixels inside the image, ordered corners
                x1, y1, x2, y2 = o['bbox_2d'] or (0, 0, 1, 1)
                px, py = o['point_2d'] or (0, 0)
                assert 0 <= x1 < x2 < W and 0 <= y1 < y2 < H and 0 <= px < W and 0 <= py < H
        masks = segment.segment(SEG, sample.image, objs or [], key=sample.id)[0]
        (total, comps), took = cpu_time(R.reward, text, sample, masks, stage, objs)
        assert took <= LIMIT, f'reward took {took * 1e3:.0f} ms'
        assert 0 <= comps['format'] <= 3 and comps['non_repeat'] in (0.0, 1.0)
        assert 0 <= comps['accuracy'] <= (9 if stage == 1 else 10)
        assert total == pytest.approx(comps['format'] + comps['accuracy'] + comps['non_repeat'])
        assert isinstance(comps['correct'], bool) and comps['n_pred'] == len(objs or [])
        single.append((total, comps))
    group, took = cpu_time(R.score_group, texts, sample, SEG, stage, INPUT, mode)
    assert took <= GROUP * LIMIT, f'score_group took {took * 1e3:.0f} ms'
    assert group == single  # the batched path scores what the single path scores


# ----------------------------------------------------------------------------- worst cases, 200 k chars
N = 200_000
_PY_OBJ = "{'label': 'cup', 'bbox_2d': [10, 20, 30, 40], 'point_2d': [15, 25]}, "
_JSON_OBJ = '{"label": "cup", "bbox_2d": [1, 2, 3, 4], "point_2d": [1, 2]},'
_BIG = '9' * 4299  # the longest int Python converts (it is quadratic in the digits)


def fill(unit, head='', tail=''):
    return head + unit * ((N - len(head) - len(tail)) // len(unit)) + tail


WORST = {  # each defeats a naive version: lazy regexes, repeated decoding, per-item Python work
    'answer-open': '<answer>' * 25_000, 'answer-close': fill('</answer>'), 'answer-pairs': fill('<answer></answer>'),
    'think-close': fill('</think>', '<think>'), 'think-answer': fill('</think><answer>', '<think>', '</answer>'),
    'think-answer-x': fill('</think><answer></answer>x', '<think>'),
    'think-space': fill('</think>' + ' ' * 50, '<think>', '</answer>'),
    'bare-50-openers': fill('1,', '[' * 50), 'bare-openers': fill('['), 'bare-dicts': fill('{"a": '),
    'bare-big-ints': '[' * 49 + ','.join([_BIG] * (N // 4300)),
    'nested': fill('[', '<answer>', '</answer>'), 'keys': fill('"bbox_2d": [', '<answer>', '</answer>'),
    'keys-single': fill("'point_2d': [", '<answer>', '</answer>'),
    'long-coords': fill('1,', '<answer>[{"point_2d": [', '}</answer>'),
    'long-space': fill(' ', '<answer>[{"point_2d": [', '}]"</answer>'),
    'comma-space': fill(' ', '<answer>,', '</answer>'), 'commas': fill(', ', '<answer>[', '</answer>'),
    'python-literal': fill(_PY_OBJ, '<answer>[', ']</answer>'),
    'python-at-limit': '<answer>[' + _PY_OBJ * (A.PY_LITERAL_MAX // len(_PY_OBJ) - 2) + _PY_OBJ[:-5] + '}}]"]</answer>',
    'json-objects': fill(_JSON_OBJ, '<think>a</think><answer>[', '{}]</answer>'),
    'empty-items': fill('{},', '<answer>[', '{}]</answer>'),
    'big-ints': '<answer>[' + ','.join([_BIG] * 46) + ']</answer>',
    'quotes': fill('"', '<answer>', '</answer>'), 'single-quotes': fill("'", '<answer>', '</answer>'),
    'fences': fill('```', '<answer>', '</answer>'), 'digits': fill('1', '<answer>', '</answer>'),
    'infs': fill('1e309,', '<answer>[', '1]</answer>'), 'unicode': fill('\u2003\xa0é', '<answer>', '</answer>'),
    'dots': fill('.'), 'sentences': fill('a. b. '),
    'brace-typos': fill('{"point_2d": [1, 2}', '<answer>[', ']</answer>'),
    'brace-typos-2': fill('"point_2d": [1, 2}}', '<answer>[', ']</answer>'),
    'stray-quotes': fill('"bbox_2d": [1,2,3,4]"', '<answer>[', ']</answer>'),
}
rng = random.Random(0)
for i in range(4):  # and random token soup: any text, not only the ones thought of
    WORST[f'soup-{i}'] = ''.join(rng.choice(_TOKENS) for _ in range(N // 4))[:N]


@pytest.mark.parametrize('name', WORST)
def test_any_200k_text_takes_at_most_50ms(name):
    text, sample = WORST[name], SAMPLES[2]
    assert len(text) <= N
    objs, took = min((cpu_time(A.parse_answer, text) for _ in range(2)), key=lambda r: r[1])
    assert took <= LIMIT, f'parse_answer: {took * 1e3:.0f} ms'
    masks = np.zeros((len(objs or []), H, W), bool)
    for fn, args in [(R.format_reward, (text,)), (R.non_repeat_reward, (text,)),
                     (R.reward, (text, sample, masks, 2)),
                     (R.score_group, ([text], sample, SEG, 2, INPUT, 'auto'))]:
        took = min(cpu_time(fn, *args)[1] for _ in range(2))
        assert took <= LIMIT, f'{fn.__name__}: {took * 1e3:.0f} ms'
