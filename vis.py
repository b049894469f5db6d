"""vis.py: every picture the project draws, each one readable on its own.

  overlay           eval / predict: image | ground truth | prediction (vote clusters, boxes, points,
                    labels), the query as title, the shortened think and the IoU on the figure
  plot_curve        eval: gIoU / cIoU against the number of voting samples, with 95% intervals
  plot_training_curves  train: reward, accuracy, held-out gIoU, response length against step, per stage
  save_mask         a mask as a black/white PNG
Rendering uses matplotlib's Agg canvas (no display, no pyplot state). Small images are drawn larger.
Tested by: python -m pytest tests/test_eval.py tests/test_predict.py
"""
import json, os, re, textwrap
import numpy as np
from PIL import Image

PALETTE = [(230, 25, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]
KEY = ('boxes: solid = in the output, dashed = a dropped vote cluster · numbers: the lines above · x = point '
       '· dotted white = ground truth')
PANEL_INCHES, DPI = 4.2, 100  # each panel ~420 px wide whatever the image size (224 px scenes x1.9)


def layer(mask, kept=True, obj=None, votes=None):
    """One drawn object: its mask, whether it is in the output, the answer's box / point / label
    (original pixels, from pipeline.segment_answers) and, under voting, its cluster's votes."""
    obj = obj or {}
    return dict(mask=np.asarray(mask, bool), kept=kept, box=obj.get('bbox_2d'), point=obj.get('point_2d'),
                label=obj.get('label'), votes=votes)


def panels(image, gt, ignore, layers):
    """-> three (H, W, 3) uint8 arrays: the image | the GT (rest dimmed; ignore grey) | the prediction
    on the half-dimmed image (kept objects filled in their colour, dropped vote clusters faint)."""
    def tint(img, m, color, a):  # alpha-blend a colour into the pixels of mask m
        img[m] = (1 - a) * img[m] + a * np.asarray(color, float)
    image = np.asarray(image, np.uint8)
    g, pr = image * np.where(gt, 1.0, 0.3)[..., None], image * 0.5  # (H, W, 3) float
    if ignore is not None:
        tint(g, ignore, (128, 128, 128), 0.8)
    for k, lay in enumerate(layers):
        tint(pr, lay['mask'], PALETTE[k % len(PALETTE)], 0.6 if lay['kept'] else 0.2)
    return image, g.astype(np.uint8), pr.astype(np.uint8)


def _figure(n_panels, aspect, text_lines):
    from matplotlib.figure import Figure  # imported here: eval's validation runs before any drawing
    head = 0.25 * text_lines + 0.4
    fig = Figure(figsize=(PANEL_INCHES * n_panels, PANEL_INCHES * aspect + head), dpi=DPI)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _draw_answer(ax, layers, shape):
    """Boxes (solid if kept, dashed if a dropped vote cluster), points (x) and a number tag per object at
    its box's corner; the labels themselves go under the figure (legend), where they cannot overlap.
    Kept objects are drawn last (on top); a tag that would cover an earlier one moves down."""
    from matplotlib.patches import Rectangle
    H, W = shape
    placed = []
    for k in sorted(range(len(layers)), key=lambda k: layers[k]['kept']):
        lay, color = layers[k], np.array(PALETTE[k % len(PALETTE)]) / 255
        style = dict(color=color, alpha=1.0 if lay['kept'] else 0.5)
        if lay['box'] is not None:
            x1, y1, x2, y2 = lay['box']
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, lw=2,
                                   ls='-' if lay['kept'] else '--', **style))
        if lay['point'] is not None:
            ax.plot(*lay['point'], marker='x', ms=9, mew=2.5, **style)
        x, y = (lay['box'][:2]) if lay['box'] is not None else (lay['point'] or (0, 0))
        x, y = min(max(x, 0), 0.93 * W), min(max(y, 0.0), 0.93 * H)
        while any(abs(x - px) < 0.07 * W and abs(y - py) < 0.07 * H for px, py in placed):
            y += 0.075 * H  # a tag already there (another cluster at the same place): below it
        placed.append((x, y))
        ax.text(x, y, str(k + 1), fontsize=9, color='white', va='top', ha='left', fontweight='bold',
                bbox=dict(facecolor=color, alpha=0.9 if lay['kept'] else 0.5, pad=1.5, lw=0))


def legend(layers):
    """One line per drawn object, in its colour: number, label, votes, kept or dropped."""
    out = []
    for k, lay in enumerate(layers):
        votes = '' if lay['votes'] is None else f" · found by {_count(lay['votes'], 'sample')}"
        state = '' if lay['votes'] is None else (' · kept' if lay['kept'] else ' · dropped')
        out.append((f"■ {k + 1}  {lay['label'] or '(no label)'}{votes}{state}", PALETTE[k % len(PALETTE)]))
    return out


def _center_note(ax, text):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha='center', va='center', fontsize=15, color='white',
            bbox=dict(facecolor='black', alpha=0.6, pad=6, lw=0))


def shorten(text, n=160):
    """The think of an answer (the whole text when it has no <think>), whitespace squeezed, cut to n
    characters."""
    m = re.search(r'<think>(.*?)(</think>|$)', text or '', re.S)
    t = ' '.join((m.group(1) if m else text or '').split())
    return t if len(t) <= n else t[:n - 1] + '…'


def _count(n, what='object'):
    return f'{n} {what}' + ('' if n == 1 else 's')


def overlay(path, image, layers, query, think='', gt=None, ignore=None, iou=None, note='', n_gt=None,
            unparsable=False):
    """Write a PNG: image | ground truth (left out when gt is None, as in predict.py) | prediction,
    the ground truth outlined on it. Titles say what each panel holds: "no target" for an empty
    ground truth, "no object" for an empty prediction, or "unparsable answer" when `unparsable` (no sample
    gave a readable answer: the empty mask is no answer at all), the IoU; the query heads the figure; the
    think (shortened here), `note` (e.g. the vote's reason) with its terms in words (vote.explain), one
    coloured line per object (label, votes, kept / dropped) and the key stand under it. n_gt: GT
    instances, for the title. Returns the matplotlib Figure (tests read its titles)."""
    img, gt_panel, pred_panel = panels(image, gt if gt is not None else np.zeros(image.shape[:2], bool),
                                       ignore, layers)
    H, W = img.shape[:2]
    kept = [lay for lay in layers if lay['kept']]
    head = textwrap.wrap(f'query: "{query}"', 100)[:2]
    key = KEY if gt is not None else KEY.rsplit(' · ', 1)[0]  # no ground truth in predict.py
    key += ' · grey = ignored pixels' if ignore is not None and ignore.any() else ''
    import vote
    wrap = 60 if gt is None else 120  # characters: predict's 2 panels are narrower than eval's 3
    foot = [(t, 'black') for t in textwrap.wrap(f'think: {shorten(think, 220)}', wrap)[:2]
            + textwrap.wrap(note, wrap)[:4] + textwrap.wrap(vote.explain(note), wrap)] + \
        legend(layers)[:12] + [(t, 'black') for t in textwrap.wrap(key, wrap)]
    fig, axes = _figure(2 if gt is None else 3, H / W, len(head) + len(foot))
    shown = [(img, f'image ({W}×{H})')]
    if gt is not None:
        shown.append((gt_panel, 'ground truth: ' + ('no target' if not gt.any() else _count(n_gt) if n_gt else 'mask')))
    any_pred = any(lay['mask'].any() for lay in kept)
    what = _count(len(kept)) if any_pred else 'unparsable answer' if unparsable else 'no object'
    if any(lay['votes'] is not None for lay in layers):
        what = f'{len(kept)} of {_count(len(layers), "vote cluster")} kept'
    shown.append((pred_panel, f'prediction: {what}' + ('' if iou is None else f' · IoU {iou:.2f}')))
    for ax, (arr, title) in zip(axes, shown):
        ax.imshow(arr, interpolation='nearest')
        ax.set_title(title, fontsize=12)
        ax.set_xticks([]), ax.set_yticks([])
    if gt is not None and not gt.any():
        _center_note(axes[1], 'no target')
    elif gt is not None:  # the GT's outline on the prediction, to see where it misses
        axes[-1].contour(gt, levels=[0.5], colors='white', linewidths=1.2, linestyles='dotted')
    if not any_pred:
        _center_note(axes[-1], 'unparsable answer\n(not "no object")' if unparsable else 'predicted: no object')
    _draw_answer(axes[-1], layers, (H, W))
    fig.suptitle('\n'.join(head), fontsize=13, y=0.995, va='top')
    inches = fig.get_figheight()
    for i, (line, color) in enumerate(foot):  # one text per line: the legend's lines in their objects' colours
        fig.text(0.01, (0.1 + 0.2 * (len(foot) - 1 - i)) / inches, line, fontsize=10, va='bottom', family='monospace',
                 color=np.array(color) / 255 if isinstance(color, tuple) else color)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - (0.3 * len(head) + 0.3) / inches,
                        bottom=(0.2 * len(foot) + 0.15) / inches, wspace=0.03)
    fig.savefig(path)
    return fig


def plot_curve(curve, path, title):
    """curve: {n: {'gIoU', 'cIoU', 'gIoU_ci', 'cIoU_ci'}} -> PNG of both against n (log 2), with 95% CIs."""
    from matplotlib.figure import Figure
    ns = sorted(curve, key=int)
    fig = Figure(figsize=(5.5, 3.8), dpi=DPI)
    ax = fig.subplots()
    for key in ('gIoU', 'cIoU'):
        y = np.array([100 * curve[n][key] for n in ns])
        ci = [curve[n].get(f'{key}_ci') for n in ns]
        err = None if None in ci else np.abs(np.array([[100 * c[0], 100 * c[1]] for c in ci]).T - y)
        shift = 1.0 if key == 'gIoU' else 1.03  # side by side, so the intervals do not hide each other
        ax.errorbar([int(n) * shift for n in ns], y, yerr=err, marker='o', capsize=3, label=key)
    ax.set_xscale('log', base=2)
    ax.set(xticks=[int(n) for n in ns], xticklabels=ns, xlabel='samples per query (majority vote; 1 = one sample)',
           ylabel='% (95% bootstrap CI)', title=title)
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return fig


# ------------------------------------------------------------------ training curves
CURVES = [('reward', 'reward (mean over rollouts)'), ('accuracy', 'accuracy reward'),
          ('val_giou', 'held-out gIoU, % (greedy)'), ('resp_len', 'response length (tokens)'),
          ('loss', 'loss')]


def read_log(path):
    """log.jsonl -> records, one per step (the last one written wins: a resumed run repeats steps)."""
    by_step = {}
    for line in open(path):
        line = line.strip()
        if line:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill: skip it
                continue
            by_step[rec.get('step')] = rec
    return [by_step[s] for s in sorted(k for k in by_step if isinstance(k, (int, float)))]


def _stage_name(path, recs):
    """'stage N' from the records' 'stage' key, else the log's folder name (runs/stage2/log.jsonl)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    m = re.search(r'stage\s*(\d)', folder)
    stage = recs[0].get('stage', m.group(1) if m else None)
    return f'stage {stage}' if stage is not None else folder


def _smooth(y, half):
    """Centred moving average over 2 * half + 1 steps, on fewer at the ends (no edge artefacts)."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    lo, hi = np.maximum(np.arange(len(y)) - half, 0), np.minimum(np.arange(len(y)) + half + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_training_curves(log_jsonl_path, out_png):
    """A training log (or a list of them, one per stage) -> PNG, one row per stage, one panel per
    quantity the stage logs: reward, accuracy, held-out gIoU (at the steps that have it), response
    length; loss only for a stage without reward (stage 0's language loss). Per-step series are drawn
    faint, with a moving average on top. Returns the Figure, or None when no log holds a record."""
    from matplotlib.figure import Figure
    paths = [log_jsonl_path] if isinstance(log_jsonl_path, (str, os.PathLike)) else list(log_jsonl_path)
    stages = [(_stage_name(p, recs), recs) for p in paths if os.path.isfile(p) for recs in [read_log(p)] if recs]
    rows = [(name, recs, [(k, t) for k, t in CURVES if any(isinstance(r.get(k), (int, float)) for r in recs)
                          and (k != 'loss' or not any('reward' in r for r in recs))]) for name, recs in stages]
    rows = [row for row in rows if row[2]]
    if not rows:
        return None
    cols = max(len(keys) for _, _, keys in rows)
    fig = Figure(figsize=(4.2 * cols, 3.2 * len(rows)), dpi=DPI)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for row, (name, recs, keys) in enumerate(rows):
        color = f'C{name[-1]}' if name[-1].isdigit() else f'C{row}'  # one colour per stage in every figure
        for col, ax in enumerate(axes[row]):
            if col >= len(keys):
                ax.set_visible(False)
                continue
            key, title = keys[col]
            pts = np.array([(r['step'], r[key]) for r in recs if isinstance(r.get(key), (int, float))], float)
            which = next((r['val_queries'] for r in recs if r.get('val_queries')), '')
            if key == 'val_giou':  # in % from 0 to 100, as eval's tables: a 0.8-point drift looks like one
                ax.plot(pts[:, 0], 100 * pts[:, 1], marker='o', ms=4, color=color, label=name)
                ax.set_ylim(0, 100)
                title += f'\n{which}' if which else ''  # stage 1 and stage 2 check different queries
            else:
                ax.plot(pts[:, 0], pts[:, 1], color=color, alpha=0.25, lw=0.8)
                ax.plot(pts[:, 0], _smooth(pts[:, 1], len(pts) // 20), color=color, lw=1.8, label=name)
            ax.set_title(f'{name}: {title}', fontsize=10)
            ax.set_xlabel('step')
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig


def save_mask(mask, path):
    """(H, W) bool -> 8-bit PNG, 255 where the mask is set."""
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(path)
