"""answer.py: what the policy writes, read: parse an answer's objects (method §2) and map their
coordinates to the original image (method §3). Pure functions of strings and numbers; never raises
on model output, and runs in linear time (a degenerate 2,048-token rollout must not stall a step).
Re-exported by model.py (model.parse_answer, model.to_original).
Tested by: python -m pytest tests/test_answer.py tests/test_fuzz.py
"""
import ast, itertools, json, math, re
import numpy as np


MAX_OBJECTS = 120  # only an answer's first 120 objects are used, in the reward and in the vote
PY_LITERAL_MAX = 16_000  # chars; ast.literal_eval costs ~1 µs a char, and 120 objects take ~10k
_FENCE = re.compile(r'^```[a-zA-Z]*|```$')
_TRAILING_COMMA = re.compile(r',\s*([\]}])')
_OPENER = re.compile(r'[\[{]')
# A coordinate list's opening and its numbers; the repairs below only touch such lists. Each match
# starts at a key and its character class stops at the first bracket or quote: linear time.
_COORDS = r'''(["'](?:bbox|point)_2d["']\s*:\s*\[[-+.\deE,\s]*)'''
_REPAIRS = [(re.compile(_COORDS + r'\}(?=\s*\})'), r'\1]'),  # [35, 55}}] -> [35, 55]}]
            (re.compile(_COORDS + r'\}'), r'\1]}'),          # [35, 55}]  -> [35, 55]}]
            (re.compile(_COORDS + r'\]"'), r'\1]')]          # [35, 55]"  -> [35, 55]


def _py_literal(s):
    if len(s) > PY_LITERAL_MAX:
        raise ValueError('too long for a Python literal')
    return ast.literal_eval(s)


def _load_json_ish(s):
    """JSON, JSON without trailing commas, a Python literal (single quotes); then the same again after
    the reference's two repairs (a list closed by a brace, a stray quote after a list). -> value or None."""
    s = s.strip()
    if s.startswith('```'):
        s = _FENCE.sub('', s).strip()
    fixed = s
    for pattern, repl in _REPAIRS:
        fixed = pattern.sub(repl, fixed)
    for text in dict.fromkeys((s, fixed)):  # the repaired text only if the repairs changed it
        for load in (json.loads, lambda t: json.loads(_TRAILING_COMMA.sub(r'\1', t)), _py_literal):
            try:
                return load(text)
            except Exception:  # noqa: BLE001 - anything the model writes must fail softly
                continue
    return None


def _first_json(text, tries=50):
    """The first of the text's first `tries` bracketed blocks that decodes as JSON, or None. A failed
    attempt can read to the end ('[' * 50 + '1,' * 99975): attempts stop once they have read 4x the
    text (a failure without a position, such as a 5,000-digit number, is charged the rest of it)."""
    dec, budget = json.JSONDecoder(), 4 * len(text)
    for m in itertools.islice(_OPENER.finditer(text), tries):
        try:
            return dec.raw_decode(text, m.start())[0]
        except json.JSONDecodeError as e:
            budget -= e.pos - m.start()
        except (ValueError, RecursionError):
            budget -= len(text) - m.start()
        if budget < 0:
            return None
    return None


def _numbers(v, n):
    """A list of n finite numbers -> n floats, else None (bools, strings, NaN, inf, ints past 1e308)."""
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return None
    try:
        out = [float(x) for x in v]
    except OverflowError:
        return None
    return out if all(math.isfinite(x) for x in out) else None


def answer_block(text):
    """The text between the first <answer> and the next </answer>, or None. (str.find, not a lazy
    regex: re.search(r'<answer>(.*?)</answer>') is quadratic on '<answer>' repeated.)"""
    start = text.find('<answer>')
    end = text.find('</answer>', start + 8) if start >= 0 else -1
    return text[start + 8:end] if end >= 0 else None


def answer_items(text, bare_json=True):
    """The answer's list of items as decoded (a lone dict is a list of one), or None. Without an
    <answer> block: the first bracketed JSON in the text, if bare_json."""
    block = answer_block(text)
    value = _load_json_ish(block) if block is not None else _first_json(text) if bare_json else None
    value = [value] if isinstance(value, dict) else value
    return list(value) if isinstance(value, (list, tuple)) else None


def object_fields(item):
    """A decoded dict item -> {'label', 'bbox_2d', 'point_2d'}, each None where missing or invalid."""
    label = item.get('label')
    return {'label': label.strip() if isinstance(label, str) and label.strip() else None,
            'bbox_2d': _numbers(item.get('bbox_2d'), 4), 'point_2d': _numbers(item.get('point_2d'), 2)}


def parse_answer(text):
    """Model output -> its objects [{'label', 'bbox_2d', 'point_2d'}] (invalid fields None), at most
    MAX_OBJECTS; [] for "no object"; None when nothing parsable is there. Never raises."""
    return answer_objects(answer_items(text) if isinstance(text, str) else None)


def answer_objects(items):
    """answer_items' list -> the objects parse_answer returns (split so that a reward decodes a text once).
    An object is a dict item with a valid box or point: items with neither ({}, a bare label) are not
    objects, so [{}] is a "no object" answer and [A, {}] is [A]. Other items (numbers, strings) are
    skipped; an answer made only of them is unparsable."""
    try:
        if items is None or (items and not any(isinstance(o, dict) for o in items)):
            return None
        objects = []
        for item in items:
            if isinstance(item, dict) and ('bbox_2d' in item or 'point_2d' in item):  # {} is quick
                fields = object_fields(item)
                if fields['bbox_2d'] or fields['point_2d']:
                    objects.append(fields)
                    if len(objects) == MAX_OBJECTS:
                        break
        return objects
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------- coordinates (method §3)
GRIDS = {'pixel': None, 'grid1000': 1000, 'unit': 1}  # coord_mode -> grid; 'auto' infers it


def coord_grid(objects, coord_mode):
    """The grid the answer's numbers live on: None = pixels of the model's input image (Qwen2.5-VL),
    1 = [0, 1], 999 or 1000 = Qwen3-VL's relative grids. 'auto' infers it from the largest |value| as
    the reference does: <= 1.2 -> 1, <= 999.5 -> 999, <= 1000.5 -> 1000, else pixels."""
    if coord_mode in GRIDS:
        return GRIDS[coord_mode]
    if coord_mode != 'auto':
        raise ValueError(f'coord_mode must be pixel|grid1000|unit|auto, got {coord_mode!r}')
    top = max((abs(v) for o in objects for k in ('bbox_2d', 'point_2d') if o.get(k) is not None
               for v in o[k]), default=0.0)
    return 1 if top <= 1.2 else 999 if top <= 999.5 else 1000 if top <= 1000.5 else None


def _pixel(v, scale, side, grid):
    """One model coordinate -> a pixel index in [0, side - 1]. Pixels: v * scale rounded half up (the
    reference's Qwen2.5-VL rule); grids: round(v * (side - 1) / grid), Python's round (half to even)
    as the reference's Qwen3-VL rule. Huge values clamp before rounding, so nothing overflows."""
    try:
        v = float(v)
    except OverflowError:  # an int past 1e308
        v = math.inf if v > 0 else -math.inf
    x = v * scale if grid is None else v * (side - 1) / grid
    x = min(max(x, -1.0), float(side)) if x == x else 0.0  # NaN (inf * 0) -> 0
    return min(max(math.floor(x + 0.5) if grid is None else round(x), 0), side - 1)


def _widen(lo, hi, side):
    """Keep a box at least 1 px wide where the image allows it."""
    if hi > lo or side < 2:
        return lo, hi
    return (lo, lo + 1) if lo + 1 < side else (lo - 1, lo)


def to_original(objects, orig_wh, input_wh, coord_mode='pixel'):
    """Model-space objects -> original-pixel objects: scale and round (see _pixel), clamp to the image,
    order corners, keep boxes at least 1 px. A missing box or point stays None."""
    W, H = orig_wh
    grid = coord_grid(objects, coord_mode)
    sx, sy = W / input_wh[0], H / input_wh[1]
    out = []
    for o in objects:
        box, pt = o.get('bbox_2d'), o.get('point_2d')
        if box is not None:
            x1, x2 = _widen(*sorted(_pixel(v, sx, W, grid) for v in box[0::2]), W)
            y1, y2 = _widen(*sorted(_pixel(v, sy, H, grid) for v in box[1::2]), H)
            box = [x1, y1, x2, y2]
        if pt is not None:
            pt = [_pixel(pt[0], sx, W, grid), _pixel(pt[1], sy, H, grid)]
        out.append({**o, 'bbox_2d': box, 'point_2d': pt})
    return out


def place_answers(texts, orig_wh, input_wh, coord_mode='pixel'):
    """Answers -> per answer its objects in original pixels, or None where unparsable."""
    return place_objects([parse_answer(t) for t in texts], orig_wh, input_wh, coord_mode)


def place_objects(objects, orig_wh, input_wh, coord_mode='pixel'):
    """parse_answer's objects (one list or None per answer) -> the same in original pixels."""
    return [None if o is None else to_original(o, orig_wh, input_wh, coord_mode) for o in objects]


def to_model(xy, orig_wh, input_wh):
    """Original-pixel coordinates (..., 2k) -> model input pixels, rounded (for teacher targets)."""
    xy = np.asarray(xy, float)
    scale = np.tile([input_wh[0] / orig_wh[0], input_wh[1] / orig_wh[1]], xy.shape[-1] // 2)
    return np.floor(xy * scale + 0.5).astype(int)
