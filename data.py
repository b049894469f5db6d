"""data.py: one `Sample` record for every dataset this project reads, the loaders for the formats
users bring (method §11: ReasonSeg folders; parquet / arrow rows, evaluation and training), the 840x840 model-input
resize (method §3) and the GT point of a mask.

Loaders are eager, returning plain lists (a split fits in memory; the skip report needs a full pass).
Bad input is never a silent wrong mask: BadData names the file / row and field, or with skip_bad=True
the item is skipped and counted in one warning. sandbox/world.py (the synthetic sandbox) makes the same records.
Tested by: python -m pytest tests/test_data.py
"""
import glob, io, json, os, warnings
from dataclasses import dataclass, field
import numpy as np
from PIL import Image, ImageDraw, ImageOps


@dataclass
class Sample:
    id: str                       # unique within its split, e.g. "reasonseg/val/123" or "world/test/7/2"
    image: np.ndarray             # (H, W, 3) uint8, the ORIGINAL image (SAM and metrics work here)
    query: str                    # the (implicit) query, raw; model.normalize_query cleans it
    masks: np.ndarray             # (K, H, W) bool, one per target instance; K = 0 means "no target"
    boxes: np.ndarray = None      # (K, 4) float x1,y1,x2,y2 in original pixels, or None (masks only)
    points: np.ndarray = None     # (K, 2) float x,y in original pixels, or None
    labels: list = field(default_factory=list)  # K short names ("red circle"); may be empty
    reasoning_type: str = None    # ReasonSeg-X type / world family, e.g. "P/F"; None if unknown
    ignore: np.ndarray = None     # (H, W) bool pixels excluded from metrics, or None
    think: str = None             # a teacher's reasoning for stage 0 (synthetic world), or None

    @property
    def gt_mask(self):
        """(H, W) bool union of all target instances."""
        h, w = self.image.shape[:2]
        return self.masks.any(0) if len(self.masks) else np.zeros((h, w), bool)

class BadData(ValueError):
    """A corrupt file or row; the message names it and the field."""

def resize_for_model(image, size=840):
    """(H, W, 3) uint8 -> size x size PIL image, bilinear as in the reference's eval, aspect not
    kept; model coordinates map back with W/size, H/size (model.to_original). method §3."""
    return Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR)

def gt_point(mask):
    """(H, W) bool -> (x, y): the pixel farthest (Euclidean) from the background. Outside the image
    counts as background (a border point is a poor SAM prompt); ties: first in row-major order."""
    from scipy.ndimage import distance_transform_edt
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError('gt_point of an empty mask')
    # Exact on the mask's box: past its 1-px background ring nothing is nearer. Row-major order kept.
    crop = np.pad(np.asarray(mask, bool)[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 1)
    d = distance_transform_edt(crop)[1:-1, 1:-1]  # (h, w) of the box
    y, x = np.unravel_index(np.argmax(d), d.shape)
    return float(x + xs.min()), float(y + ys.min())

def boxes_points(masks):
    """(K, H, W) bool, none empty -> boxes (K, 4) inclusive extent x1,y1,x2,y2, points (K, 2)."""
    boxes, points = np.zeros((len(masks), 4)), np.zeros((len(masks), 2))
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[k], points[k] = (xs.min(), ys.min(), xs.max(), ys.max()), gt_point(m)
    return boxes, points

def to_rgb(im):
    """A PIL image -> (H, W, 3) uint8, EXIF orientation applied. 16-bit grey (PNG, TIFF: modes I;16*, I) is
    scaled to 8 bits (/257) first: PIL's convert would clip every value above 255 to white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N'):
        im = Image.fromarray((np.asarray(im, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return np.asarray(im.convert('RGB'))

def _image(src, where, base=''):
    """bytes, a path (relative to base) or an HF image struct {bytes, path} -> (H, W, 3) uint8, EXIF
    orientation applied as cv2.imread (LISA), labelme (ReasonSeg's annotator) and HF datasets do."""
    src = (src.get('bytes') or src.get('path')) if isinstance(src, dict) else src
    try:
        return to_rgb(Image.open(io.BytesIO(src) if isinstance(src, bytes) else os.path.join(base, src)))
    except Exception as e:  # noqa: BLE001 - any decoder failure (garbled EXIF too) is a corrupt image
        raise BadData(f'{where}: unreadable image ({type(e).__name__}: {e})') from None

def _collect(items, make, skip_bad, what):
    """items: (where, *args); make(where, *args) -> Sample, or None for "no target polygon"."""
    out, bad, empty = [], [], []
    for where, *args in items:
        try:
            s = make(where, *args)
        except Exception as e:  # noqa: BLE001 - name the item (a KeyError names the missing field)
            msg = str(e) if isinstance(e, BadData) else f'{where}: {type(e).__name__}: {e}'
            if not skip_bad:
                raise BadData(msg) from e
            bad.append(msg)
            continue
        (out if s is not None else empty).append(s if s is not None else where)
    if empty:
        warnings.warn(f'{what}: skipped {len(empty)} file(s), no target polygon: {", ".join(empty)}')
    if bad:
        warnings.warn(f'{what}: skipped {len(bad)} corrupt item(s) (skip_bad); first: {bad[0]}')
    return out

# ----------------------------------------------------------------------------- ReasonSeg (LISA)
MAX_COORD = 10 ** 6  # polygon vertices beyond it are refused: PIL's rasteriser wraps past 2^31 (a wrong mask)

def _fill(hw, pts):
    """Polygon -> (H, W) bool, rasterised by PIL like LISA's cv2 fillPoly + polylines (equal on
    axis-aligned edges): integer vertices are pixel centres and a pixel is set iff its centre is inside
    or on the outline, so the rectangle (1,1),(6,1),(6,5),(1,5) covers columns 1..6 of rows 1..5."""
    canvas = Image.new('L', hw[::-1], 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=1, outline=1)
    return np.asarray(canvas) > 0

def _reasonseg_item(where, stem, split):
    with open(stem + '.json') as f:
        meta = json.load(f)
    image = _image(stem + '.jpg', f'{stem}.jpg')
    hw, polys = image.shape[:2], []  # polys: (is_ignore, (H, W) bool polygon)
    for j, sh in enumerate(meta.get('shapes', [])):
        label = str(sh.get('label', '')).lower()
        if label != 'flag':
            xy = [(float(x), float(y)) for x, y in sh['points']]
            far = next((v for v in xy if not max(map(abs, v)) <= MAX_COORD), None)  # NaN too: PIL would wrap
            if far:
                raise BadData(f'{where}: shapes[{j}] has the point {far}, beyond ±{MAX_COORD:,} px '
                              f'(the image is {hw[1]}x{hw[0]})')
            pts = [(int(x), int(y)) for x, y in xy]  # truncation, like LISA's int32 cast
            if len(pts) < 3:
                raise BadData(f'{where}: shapes[{j}] has {len(pts)} points, a polygon needs 3')
            poly = _fill(hw, pts)
            if not poly.any():  # a target drawn off the image would become a silent "no object" sample
                raise BadData(f'{where}: shapes[{j}] ({label!r}) lies outside the {hw[1]}x{hw[0]} image')
            polys.append(('ignore' in label, poly))
    if all(ig for ig, _ in polys):
        return None
    # Largest area first (ties keep file order), later ones overwrite: a small ignore region inside a
    # target is cut out of it, a small target inside an ignore region stays target. Instance = its
    # polygon AND "target" in the final map, so their union is the target label, disjoint from ignore.
    polys.sort(key=lambda p: -p[1].sum())
    lab = np.zeros(hw, np.uint8)  # (H, W): 0 background, 1 target, 255 ignore (method §11)
    for ig, m in polys:
        lab[m] = 255 if ig else 1
    masks = [t for t in (m & (lab == 1) for ig, m in polys if not ig) if t.any()]  # largest first
    masks = np.array(masks, bool).reshape(-1, *hw)  # (K, H, W)
    return Sample(f'reasonseg/{split}/{os.path.basename(stem)}', image,
                  query(meta.get('text'), f'{where}: field text'), masks,
                  *boxes_points(masks), ignore=lab == 255)

def load_reasonseg(folder, skip_bad=False):
    """LISA ReasonSeg split folder (name.jpg + name.json) -> [Sample]. "flag" shapes are dropped,
    "ignore" ones form Sample.ignore; files with no target polygon (2 in LISA's test) are skipped."""
    split = os.path.basename(os.path.normpath(folder))
    stems = [p[:-5] for p in sorted(glob.glob(os.path.join(folder, '*.json')))]
    return _collect(((f'{s}.json', s, split) for s in stems), _reasonseg_item, skip_bad, folder)

def query(text, where):
    """A query field: one string, or a list of phrasings (the first is used). Anything else is BadData."""
    text = text[0] if isinstance(text, list) and text else text
    if not isinstance(text, str) or not text.strip():
        raise BadData(f'{where} must be a non-empty string (or a list of them), got {text!r:.60}')
    return text

def load_dataset(path, skip_bad=False):
    """Dispatch on what is at `path`: a ReasonSeg folder, or parquet/arrow rows (training rows
    by their problem + solution_mask columns, else evaluation rows with a mask column). A dataset that
    ends up empty is an error, not a NaN score later."""
    if glob.glob(os.path.join(path, '*.json')) and glob.glob(os.path.join(path, '*.jpg')):
        out = load_reasonseg(path, skip_bad)
    else:
        kind, files = table_files(path)
        cols = set(open_table(files[0], kind, schema_only=True).names) if files else set()
        if {'problem', 'solution_mask'} <= cols:
            out = load_training_rows(path, skip_bad)
        elif 'mask' in cols:
            out = load_hf(path, skip_bad)
        else:
            raise ValueError(f'{path}: no such file or folder' if not os.path.exists(path) else
                             f'{path}: neither a ReasonSeg folder (*.jpg + *.json) nor evaluation / training '
                             f'rows (columns {sorted(cols)})')
    if not out:
        raise BadData(f'{path}: no usable sample (all skipped)')
    return out


# --- the table formats users bring: parquet files or `datasets.save_to_disk` arrow folders ---
# HF-style evaluation rows (ReasonSeg-X val/test, ReasonSeg-R, MUSE, MMR: image, text, mask) and training
# rows (stage 1: problem, image, solution, solution_mask; stage 2, ReasonSeg-X train as published: problem,
# image, solution_mask), method §11. Every row becomes a Sample; a corrupt row is named by file, row, field.

def table_files(path):
    """-> ('parquet'|'arrow', files): a file, a parquet folder, a save_to_disk folder (*.arrow)."""
    for ext in ('parquet', 'arrow'):
        fs = [path] if path.endswith('.' + ext) else sorted(glob.glob(os.path.join(path, '*.' + ext)))
        if fs and os.path.isfile(fs[0]):
            return ext, fs
    return None, []

def open_table(f, kind, schema_only=False):
    try:
        import pyarrow as pa, pyarrow.ipc as ipc, pyarrow.parquet as pq
    except ImportError:
        raise ImportError('pip install pyarrow to read parquet/arrow') from None
    try:
        if kind == 'parquet':
            return pq.read_schema(f) if schema_only else pq.read_table(f)
        try:  # datasets writes the IPC stream format; plain Arrow files use the file format
            r = ipc.open_stream(pa.memory_map(f))
        except pa.ArrowInvalid:
            r = ipc.open_file(pa.memory_map(f))
        return r.schema if schema_only else r.read_all()
    except (OSError, pa.ArrowException) as e:
        raise BadData(f'{f}: unreadable {kind} file ({e})') from None

def _rows(path):
    """-> ("file: row j", name, row index over all files, {column: non-null pyarrow scalar}, folder)"""
    kind, paths = table_files(path)
    if not paths:
        raise FileNotFoundError(f'{path}: no .parquet or .arrow files there')
    name, i = os.path.splitext(os.path.basename(os.path.normpath(path)))[0], 0
    for f in paths:
        start = i
        for b in open_table(f, kind).to_batches():
            for j in range(b.num_rows):
                row = {c: b.column(c)[j] for c in b.schema.names if b.column(c)[j].is_valid}
                yield f'{f}: row {i - start}', name, i, row, os.path.dirname(f)
                i += 1

def _mask(v, hw, where):
    """pyarrow value -> (H, W) bool, shape checked. The HF sets hold nested lists of bool (read with
    no Python object per pixel); an HF image struct or PNG bytes also work (non-zero = True)."""
    rows = getattr(v, 'values', None)
    if rows is not None and hasattr(rows, 'value_lengths'):  # list<list<...>>: H rows of W
        flat = rows.flatten()
        if rows.null_count or flat.null_count or len(set(rows.value_lengths().to_pylist())) > 1:
            raise BadData(f'{where}: ragged or null nested list')
        m = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(bool).reshape(len(rows), -1)
    else:
        b = v.as_py()
        try:
            m = np.asarray(Image.open(io.BytesIO(b.get('bytes') if isinstance(b, dict) else b)))
        except Exception as e:  # noqa: BLE001
            raise BadData(f'{where}: not nested lists nor image bytes ({type(e).__name__})') from None
        m = (m[..., :3].any(-1) if m.ndim == 3 else m).astype(bool)
    if m.shape != tuple(hw):
        raise BadData(f'{where}: mask shape {m.shape} != image shape {tuple(hw)}')
    return m

def _hf_item(where, name, i, row, base):
    image = _image(row['image'].as_py(), f'{where}: field image', base)
    hw = image.shape[:2]
    if 'img_height' in row and (row['img_height'].as_py(), row['img_width'].as_py()) != hw:
        raise BadData(f'{where}: fields img_height, img_width != image shape {hw}')
    m = _mask(row['mask'], hw, f'{where}: field mask')
    masks = m[None] if m.any() else np.zeros((0, *hw), bool)  # (K, H, W): K = 1 union, 0 if empty
    ids = [row[k].as_py() for k in ('image_id', 'ann_id') if k in row]
    rt = row['reasoning_type'].as_py() if 'reasoning_type' in row else None
    return Sample('/'.join(map(str, [name, i, *ids])), image, query(row['text'].as_py(), f'{where}: field text'),
                  masks, *boxes_points(masks), reasoning_type=rt)

def _training_item(where, name, i, row, base):
    """A stage-1 row (solution: boxes + points in the stored image's pixels, solution_mask) or a
    stage-2 row as ReasonSeg-X train is published (solution_mask only: boxes and points come from the
    masks, method §11). Masks are per object, in the solution's order, at the image's size."""
    image = _image(row['image'].as_py(), f'{where}: field image', base)
    H, W = image.shape[:2]
    if 'solution_mask' not in row:  # null: "no target" is said by an empty list, a null is a hole in the data
        raise BadData(f'{where}: field solution_mask is null (a row with no target holds an empty list [])')
    sm = row['solution_mask'].values
    masks = [_mask(m, (H, W), f'{where}: field solution_mask[{k}]') for k, m in enumerate(sm or [])]
    masks = np.array(masks, bool).reshape(-1, H, W)                               # (K, H, W)
    problem = query(row['problem'].as_py(), f'{where}: field problem')
    if 'solution' not in row:
        empty = [k for k, m in enumerate(masks) if not m.any()]
        if empty:
            raise BadData(f'{where}: field solution_mask[{empty[0]}] is empty (an object needs pixels)')
        return Sample(f'{name}/{i}', image, problem, masks, *boxes_points(masks))
    try:
        sol = json.loads(row['solution'].as_py())
        sol = [sol] if isinstance(sol, dict) else sol
        boxes = np.array([o['bbox_2d'] for o in sol], float).reshape(len(sol), 4)  # (K, 4)
        points = np.array([o['point_2d'] for o in sol], float).reshape(len(sol), 2)  # (K, 2)
    except Exception as e:  # noqa: BLE001
        raise BadData(f'{where}: field solution is not a JSON list of bbox_2d/point_2d ({e})') from None
    if not (np.isfinite(boxes).all() and np.isfinite(points).all()):
        raise BadData(f'{where}: field solution has a NaN or infinite coordinate')
    if np.any(boxes < 0) | np.any(boxes > [W, H] * 2) | np.any(points < 0) | np.any(points > [W, H]):
        raise BadData(f'{where}: field solution has coordinates outside the {W}x{H} image')
    if np.any(boxes[:, 2:] < boxes[:, :2]):
        raise BadData(f'{where}: field solution has an inverted box (x2 < x1 or y2 < y1)')
    if len(masks) != len(sol):
        raise BadData(f'{where}: field solution_mask has {len(masks)} masks for {len(sol)} objects')
    for k, (m, b) in enumerate(zip(masks, boxes)):  # a mask that misses its box: a misaligned row, not a target
        ys, xs = np.nonzero(m)
        if not len(xs):
            raise BadData(f'{where}: field solution_mask[{k}] is empty but solution[{k}] has the box {b.tolist()}')
        if not ((xs >= b[0] - 1) & (xs <= b[2] + 1) & (ys >= b[1] - 1) & (ys <= b[3] + 1)).any():
            raise BadData(f'{where}: field solution_mask[{k}] has no pixel inside its box solution[{k}] {b.tolist()}')
    labels = [str(o.get('label', '')) for o in sol] if any('label' in o for o in sol) else []
    return Sample(f'{name}/{i}', image, problem, masks, boxes, points, labels)

def load_hf(path, skip_bad=False):
    """HF-style eval rows (parquet file/folder, save_to_disk folder) -> [Sample]. `mask` is the union
    of all targets: K = 1 (0 if empty), box and point from it, `bbox` unused. id name/row/image/ann."""
    return _collect(_rows(path), _hf_item, skip_bad, path)

def load_training_rows(path, skip_bad=False):
    """Stage-1 rows (problem, image, solution, solution_mask) or stage-2 rows (problem, image,
    solution_mask) -> [Sample]. "Original" IS the stored image (840x840 in stage 1): boxes/points are
    the solution's numbers as-is, masks must have its shape; img_height/img_width unused."""
    return _collect(_rows(path), _training_item, skip_bad, path)
