"""sandbox/world.py: the synthetic scene world, the project's embedded default data (nothing to download).

Scenes of 3 flat-coloured shapes on a 3x3 grid (small jitter) with exact instance masks. Queries:
explicit grounding for stages 0-1 ("the red circle", "all blue shapes", absent targets -> empty),
and the four ReasonSeg-X reasoning types for stage 2 / evaluation:
  P/F  purpose-functional      "something that could be a wheel"      -> circles
  C/KI commonsense-knowledge   "the shape coloured like grass"        -> green shapes
  C/R  comparative-relational  "the largest shape", "every shape left of the red circle" 
  C/MH compositional multi-hop "same colour as the circle, not a circle"
Every family has multi-target and no-target cases. Splits never share a scene seed; query frames
(the wording around the cue) are split too, so test queries are phrasings never trained on, while
the knowledge cues (wheel, grass, ...) are shared. Stage 0 also sees reasoning queries whose
meaning is a query-blind guess (`guess=True`), and bare-cue facts ("grass" -> think "green"): the
base knows what each cue means, as a pretrained model would, and keeps trying different meanings
inside reasoning queries; using that knowledge there is left for RL. Why a grid: a tiny
model from scratch only learns to read positions with coarse layouts (docs/experiments.md, "Stage 0").
Tested by: python -m pytest tests/test_world.py
"""
import json
import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
import data
import model as M

SIZE, GRID, N_OBJ, JITTER = 224, 3, 3, 6       # original image side, grid, objects, px jitter
COLORS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 90, 230),
          'yellow': (235, 210, 40), 'white': (240, 240, 240)}
SHAPES = ('circle', 'square', 'triangle', 'diamond')
BACKGROUND = (30, 30, 30)
SPLIT_BASE = {'train': 0, 'val': 10_000_000, 'test': 20_000_000}
# knowledge cues (shared by all splits) and frames (split: the last frame of each family is held out)
FUNCTION = {'wheel': 'circle', 'tile': 'square', 'warning sign': 'triangle', 'kite': 'diamond'}
KNOWLEDGE = {'grass': 'green', 'sky': 'blue', 'tomato': 'red', 'banana': 'yellow', 'snow': 'white'}
FRAMES = {
    'explicit': ['the {c} {s}', 'all {c} shapes', 'every {s}', 'find the {c} {s}'],
    'P/F': ['something that could be a {f}', 'which shape would work as a {f}', 'what looks like a {f}'],
    'C/KI': ['the shape coloured like {k}', 'anything with the colour of {k}', 'what has the colour of {k}'],
    'C/R': ['the {r} shape', 'which shape is the {r} one', 'the shape that is {r} of all'],
    'C/R pos': ['every shape {p} the {o}', 'the shapes {p} the {o}', 'anything {p} the {o}'],
    'C/MH': ['the shape with the colour of the {s} that is not a {s}',
             'a shape sharing its colour with the {s} but not itself a {s}',
             'what has the {s} colour but is not a {s}'],
}
RELATIONS = ('largest', 'smallest', 'leftmost', 'rightmost', 'topmost', 'lowest')
POSITIONS = {'left of': (-1, 0), 'right of': (1, 0), 'above': (0, -1), 'below': (0, 1)}  # grid (dcol, drow)
FAMILIES = ('explicit', 'P/F', 'C/KI', 'C/R', 'C/MH')


def render(rng):
    """-> image (H,W,3) uint8, objects: list of dicts (color, shape, mask, cell)."""
    img = Image.new('RGB', (SIZE, SIZE), BACKGROUND)
    cell = SIZE / GRID
    objs = []
    for c in rng.choice(GRID * GRID, N_OBJ, replace=False):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        half = int(rng.integers(14, 31))
        cx = (c % GRID + 0.5) * cell + rng.integers(-JITTER, JITTER + 1)
        cy = (c // GRID + 0.5) * cell + rng.integers(-JITTER, JITTER + 1)
        m = Image.new('L', (SIZE, SIZE), 0)
        d = ImageDraw.Draw(m)
        box = [cx - half, cy - half, cx + half, cy + half]
        if shape == 'circle':
            d.ellipse(box, fill=1)
        elif shape == 'square':
            d.rectangle(box, fill=1)
        elif shape == 'triangle':
            d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=1)
        else:
            d.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=1)
        mask = np.array(m, bool)
        img.paste(COLORS[color], mask=m.point(lambda v: 255 * v))
        objs.append({'color': str(color), 'shape': str(shape), 'mask': mask, 'cell': int(c)})
    return np.array(img), objs


def _relation(objs, r):
    """Index of the unique extreme object, or None when the top two are too close to call."""
    ys, xs = zip(*[ndimage.center_of_mass(o['mask']) for o in objs])
    key = {'largest': [o['mask'].sum() for o in objs], 'smallest': [-o['mask'].sum() for o in objs],
           'leftmost': [-x for x in xs], 'rightmost': list(xs), 'topmost': [-y for y in ys],
           'lowest': list(ys)}[r]
    top, second = sorted(key)[-1], sorted(key)[-2]
    margin = 0.15 * abs(top) if r in ('largest', 'smallest') else 10.0
    return int(np.argmax(key)) if top - second >= margin else None


def ground(objs, c=None, s=None):
    """Indices of the objects of colour c and shape s (None: any): what an explicit phrase means."""
    return [i for i, o in enumerate(objs) if c in (None, o['color']) and s in (None, o['shape'])]


def phrase(c=None, s=None):
    """The explicit meaning as the teacher thinks it: "red circle", "red" or "circle"."""
    return ' '.join(x for x in (c, s) if x)


def make_query(rng, objs, family, split):
    """-> (query, target indices, explicit meaning or None) or None if this scene cannot host this
    family's query. The meaning ("red circle", "circle", "red") is the teacher's <think> in stage 0."""
    if family == 'fact':  # stage 0 only: a bare cue word, whose meaning is its attribute
        cue = str(rng.choice(list(FUNCTION) + list(KNOWLEDGE)))
        c, s = KNOWLEDGE.get(cue), FUNCTION.get(cue)
        return cue, ground(objs, c, s), c or s
    if family == 'C/R' and rng.random() < 0.5:
        family = 'C/R pos'  # positional relations: multi- and no-target cases for C/R too
    frames = FRAMES[family][:-1] if split == 'train' else FRAMES[family][-1:]
    frame = frames[rng.integers(len(frames))]
    colors, shapes = [o['color'] for o in objs], [o['shape'] for o in objs]
    absent = rng.random() < 0.12                       # ask for something that is not there
    pick = lambda pool, have: rng.choice([p for p in pool if (p not in have) == absent] or [None])
    if family == 'explicit':
        c, s = pick(list(COLORS), colors), pick(SHAPES, shapes)
        if '{c}' in frame and '{s}' in frame:
            i = rng.integers(len(objs))
            c, s = (c, s) if absent else (colors[i], shapes[i])
        if c is None or s is None:
            return None
        c, s = (c if '{c}' in frame else None), (s if '{s}' in frame else None)
        return frame.format(c=c, s=s), ground(objs, c, s), phrase(c, s)
    if family == 'P/F':
        s = pick(SHAPES, shapes)
        f = s and rng.choice([k for k, v in FUNCTION.items() if v == s])
        return f and (frame.format(f=f), ground(objs, s=s), None)
    if family == 'C/KI':
        c = pick(list(COLORS), colors)
        k = c and rng.choice([k for k, v in KNOWLEDGE.items() if v == c])
        return k and (frame.format(k=k), ground(objs, c=c), None)
    if family == 'C/R pos':  # relative to a uniquely named object, by grid row / column
        labels = [f'{c} {s}' for c, s in zip(colors, shapes)]
        uniq = [i for i, l in enumerate(labels) if labels.count(l) == 1]
        if not uniq:
            return None
        ref = uniq[rng.integers(len(uniq))]
        p = list(POSITIONS)[rng.integers(len(POSITIONS))]
        dc, dr = POSITIONS[p]
        col, row = objs[ref]['cell'] % GRID, objs[ref]['cell'] // GRID
        hit = [i for i, o in enumerate(objs) if (o['cell'] % GRID - col) * dc > 0 or (o['cell'] // GRID - row) * dr > 0]
        return frame.format(p=p, o=labels[ref]), hit, None
    if family == 'C/R':
        r = RELATIONS[rng.integers(len(RELATIONS))]
        i = _relation(objs, r)
        return None if i is None else (frame.format(r=r), [i], None)
    # C/MH: the colour of the (unique) shape s, on objects that are not an s; absent = no such one
    uniq = [s for s in SHAPES if shapes.count(s) == 1]  # ordered: a set's order changes per process
    if not uniq:
        return None
    s = uniq[rng.integers(len(uniq))]
    col = colors[shapes.index(s)]
    hit = [i for i in range(len(objs)) if colors[i] == col and shapes[i] != s]
    return (frame.format(s=s), hit, None) if bool(hit) != absent else None


def sample(split, index, families=FAMILIES, guess=False):
    """The index-th sample of a split: deterministic, built on the fly. guess=True replaces the
    query's meaning by a random explicit one (a colour, a shape or both, drawn without looking at the
    query) and the targets by what that meaning grounds to: stage 0's prior for reasoning queries."""
    for attempt in range(100):
        rng = np.random.default_rng([SPLIT_BASE[split] + index, attempt])
        family = families[rng.integers(len(families))]
        image, objs = render(rng)
        q = make_query(rng, objs, family, split)
        if q is None:
            continue
        query, hit, think = q
        if guess:  # the words and the way to answer, never which meaning is right
            kind, o = rng.integers(3), objs[rng.integers(len(objs))]  # colour, shape or both, mostly
            c, s = (o['color'], o['shape']) if rng.random() < 0.8 else (rng.choice(list(COLORS)), rng.choice(SHAPES))
            c, s = (str(c) if kind != 1 else None), (str(s) if kind != 0 else None)  # of a scene object
            think, hit = phrase(c, s), ground(objs, c, s)
        hit = sorted(hit, key=lambda i: objs[i]['cell'])       # row-major answer order
        masks = np.stack([objs[i]['mask'] for i in hit]) if hit else np.zeros((0, SIZE, SIZE), bool)
        boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()] for ys, xs in
                          (np.nonzero(m) for m in masks)], float).reshape(-1, 4)
        points = np.array([_peak(m, b) for m, b in zip(masks, boxes)], float).reshape(-1, 2)
        labels = [f"{objs[i]['color']} {objs[i]['shape']}" for i in hit]
        return data.Sample(id=f'world/{split}/{index}', image=image, query=query, masks=masks,
                      boxes=boxes, points=points, labels=labels, reasoning_type=family, think=think)
    raise RuntimeError(f'world: no valid query for {split}/{index}')


def _peak(mask, box):
    """GT point: the distance-transform peak (method §11), computed on the box crop for speed."""
    x1, y1, x2, y2 = box.astype(int)
    crop = np.pad(mask[y1:y2 + 1, x1:x2 + 1], 1)
    y, x = np.unravel_index(ndimage.distance_transform_edt(crop).argmax(), crop.shape)
    return x - 1 + x1, y - 1 + y1


def dataset(split, n, families=FAMILIES, start=0):
    return [sample(split, start + i, families) for i in range(n)]


def answer_text(s, input_wh):
    """The teacher answer for stage 0, in model-input pixels: think states the query's explicit
    meaning (else names the targets), then the JSON."""
    fx, fy = input_wh[0] / s.image.shape[1], input_wh[1] / s.image.shape[0]
    r = lambda v, f: int(np.floor(v * f + 0.5))
    objs = [{'label': lab, 'bbox_2d': [r(b[0], fx), r(b[1], fy), r(b[2], fx), r(b[3], fy)],
             'point_2d': [r(p[0], fx), r(p[1], fy)]} for lab, b, p in zip(s.labels, s.boxes, s.points)]
    think = s.think or (', '.join(s.labels) if s.labels else 'nothing')
    return f'<think>{think}</think><answer>{json.dumps(objs, separators=(",", ":"))}</answer>'


def teacher_batch(proc, samples, template, image_size):
    """Stage-0 inputs with the teacher answers appended, and labels that are -100 everywhere but on
    the answer tokens (left padding: the answer is the last n tokens of each row)."""
    answers = [answer_text(s, (image_size, image_size)) for s in samples]
    b = M.make_inputs(proc, [data.resize_for_model(s.image, image_size) for s in samples],
                      [M.build_prompt(s.query, template) for s in samples], answers)
    labels = torch.full_like(b['input_ids'], -100)
    for i, a in enumerate(answers):
        n = len(proc.tokenizer(a + '<|im_end|>', add_special_tokens=False).input_ids)
        labels[i, -n:] = b['input_ids'][i, -n:]
    return b, labels


def attribute_batch(proc, split, start, n, image_size):
    """n fresh scenes for stage 0's attribute heads: processor inputs, the index of each object's
    centre among the merged visual tokens of the batch (raster order, one token per 28 input px),
    and its colour and shape ids. The sandbox's stand-in for a vision tower pretrained on objects."""
    imgs, idx, col, shp = [], [], [], []
    side = image_size // 28
    for i in range(start, start + n):
        image, objs = render(np.random.default_rng([SPLIT_BASE[split] + i, 999]))
        imgs.append(data.resize_for_model(image, image_size))
        for o in objs:
            y, x = ndimage.center_of_mass(o['mask'])
            r, c = (min(side - 1, int(v * image_size / SIZE) // 28) for v in (y, x))
            idx.append((len(imgs) - 1) * side * side + r * side + c)
            col.append(list(COLORS).index(o['color']))
            shp.append(SHAPES.index(o['shape']))
    pixels = proc.image_processor(images=imgs, return_tensors='pt')
    return pixels, torch.tensor(idx), torch.tensor(col), torch.tensor(shp)


def vocabulary():
    """Every text the sandbox tokenizer must know."""
    words = list(COLORS) + list(SHAPES) + list(FUNCTION) + list(KNOWLEDGE) + list(RELATIONS) + list(POSITIONS)
    return words + [f for fs in FRAMES.values() for f in fs] + ['nothing', 'label', 'shapes']


# How alike an image is to the world's scenes, for predict.py's warning. A scene is the dark background
# with 3 flat shapes of the 5 colours: >= 98% of its pixels are within LIKE_TOL (per channel) of those 6
# colours (JPEG at quality 50, 200 test scenes) and >= 82% of the background's alone (600 scenes).
# A photo or flat shapes on a light background fall below either floor.
LIKE_TOL, LIKE_PALETTE, LIKE_BACKGROUND = 40, 0.9, 0.6


def likeness(image):
    """(H, W, 3) uint8 -> (share of pixels near one of the world's 6 colours, share near its background),
    over a grid of at most ~100,000 of its pixels (a 12-megapixel photo would need 400 MB at full size)."""
    image = np.asarray(image)
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 100_000)))
    x = image[::step, ::step].astype(np.int16)[..., None, :]                          # (h, w, 1, 3)
    palette = np.array([BACKGROUND, *COLORS.values()], np.int16)                     # (6, 3)
    near = (np.abs(x - palette).max(-1) <= LIKE_TOL)                                 # (H, W, 6)
    return float(near.any(-1).mean()), float(near[..., 0].mean())


def unlike(image):
    """'' when the image could be a world scene, else one line saying how it differs."""
    palette, background = likeness(image)
    if palette >= LIKE_PALETTE and background >= LIKE_BACKGROUND:
        return ''
    return (f'{100 * palette:.0f}% of its pixels have one of the world\'s 6 colours (scenes: >= 98%), '
            f'{100 * background:.0f}% its dark grey background (scenes: >= 82%)')
