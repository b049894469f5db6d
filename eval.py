"""eval.py: StAR evaluation, greedy or with mask-level majority voting, as one script (SPEC §10, §12).

  python eval.py --vote 8                        # sandbox: latest runs/stage{2,1} adapter, synthetic test
  python eval.py --curve 1,2,4,8,16,32           # test-time-scaling curve from one set of 32 samples
  torchrun --nproc_per_node 8 eval.py --model Qwen2.5-VL-7B --adapter runs/stage2/last/adapter.safetensors \\
      --sam sam_vit_h.pth --sam-type vit_h --data ReasonSeg-X/test --vote 8 --save-vis vis/
Writes summary.json (gIoU, cIoU overall and per reasoning type, ...), samples.jsonl and curve.png to --out.
Tested by: python -m pytest tests/test_eval.py
"""
import argparse, json, os, sys
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data, lora, pipeline, vote, world
import model as M
import segment as S

p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument('--model', default=None, help='base checkpoint dir (default: adapter meta base, else sandbox/stage0, else runs/stage0/last)')
p.add_argument('--adapter', default=None, help='LoRA file (default without --model: runs/stage2/last, else runs/stage1/last, else none)')
p.add_argument('--sam', default=None, help='segment-anything checkpoint file (default: colour segmenter of the synthetic world)')
p.add_argument('--sam-type', default='vit_h', choices=['vit_b', 'vit_l', 'vit_h'], help='SAM size')
p.add_argument('--data', default=None, help='eval set (data.load_dataset: ReasonSeg folder, HF parquet/arrow); default: synthetic test split')
p.add_argument('--limit', '--n', dest='n', type=int, default=None, help='number of samples (default: 200 synthetic, all of --data); '
               'under torchrun write --limit: torchrun takes --n for a prefix of its own flags')
p.add_argument('--image-size', type=int, default=None, help='model input side (default: adapter meta, else 840, or less if the processor keeps fewer pixels)')
p.add_argument('--coord-mode', default=None, choices=['pixel', 'grid1000', 'unit', 'auto'], help='answer coordinates (default: adapter meta, else by model type)')
p.add_argument('--prompt-file', default=None, help='prompt template with {question} (default: the base checkpoint\'s prompt.txt, else ours)')
p.add_argument('--batch', type=int, default=8, help='queries per generate call; fixed, as padding changes greedy outputs (SPEC §12)')
p.add_argument('--vote', type=int, default=1, help='samples per query: 1 = greedy, N > 1 = majority vote (SPEC §10)')
p.add_argument('--curve', default=None, help='comma-separated vote sizes, e.g. 1,2,4,8: all from one set of max-N samples')
p.add_argument('--temperature', type=float, default=1.0, help='sampling temperature when voting')
p.add_argument('--top-p', type=float, default=0.9, help='nucleus sampling when voting')
p.add_argument('--agg', default='best', choices=['best', 'consensus'], help='how a kept vote cluster becomes a mask')
p.add_argument('--max-new-tokens', type=int, default=None, help='longest response (default: 2048 with --model, 160 sandbox)')
p.add_argument('--out', default=None, help='output dir (default: runs/eval/<checkpoint>-<data>-vote<N>)')
p.add_argument('--save-vis', default=None, help='dir for PNG overlays: image | GT | prediction with vote clusters')
p.add_argument('--vis-n', type=int, default=16, help='overlays for the first K samples')
p.add_argument('--seed', type=int, default=0, help='sampling seed (per batch, so sharding does not change it)')
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
args = p.parse_args()


# ------------------------------------------------------------------ pure parts (tests call these)
def iou_stats(pairs):
    """[(intersection, union)] per sample -> gIoU = mean per-sample IoU (empty on empty = 1),
    cIoU = Σ inter / Σ union: summed counts, never averaged ratios (SPEC §12)."""
    inter, union = np.array(pairs, float).reshape(-1, 2).T  # (S,), (S,)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return dict(n=len(pairs), gIoU=float(iou.mean()) if len(pairs) else float('nan'),
                cIoU=float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0)


def summarize(recs):
    """Per-sample records -> the results table. Failures/lengths count every sampled response."""
    empty = [r for r in recs if r['gt_empty']]
    n_resp = sum(len(r['resp_len']) for r in recs)
    types = sorted({r['reasoning_type'] for r in recs if r['reasoning_type']})
    pairs = lambda rs: [(r['inter'], r['union']) for r in rs]
    return dict(**iou_stats(pairs(recs)), format_fail=sum(r['failed'] for r in recs) / max(n_resp, 1),
                no_object_acc=float(np.mean([r['pred_empty'] for r in empty])) if empty else None, n_no_object=len(empty),
                resp_len=sum(sum(r['resp_len']) for r in recs) / max(n_resp, 1),
                per_type={t: iou_stats(pairs(r for r in recs if r['reasoning_type'] == t)) for t in types})


def shard(n_items, batch, rank, world_size):
    """Whole batches round-robin over ranks: every batch is the one a single process would run,
    so greedy outputs (which depend on padding) do not depend on the number of processes."""
    batches = [list(range(i, min(i + batch, n_items))) for i in range(0, n_items, batch)]
    return [(b, idx) for b, idx in enumerate(batches) if b % world_size == rank]


def score_query(sample, answers, ns, agg='best'):
    """One query's segmented answers (pipeline.segment_answers) -> (record, final mask (H, W), layers
    [(mask, kept)] to draw). ns: vote sizes; 1 sample alone is greedy: the union of its objects."""
    gt, ign = sample.gt_mask, sample.ignore
    rec, clusters, reason = dict(curve={}), [], ''
    for n in ns:
        if len(answers) == 1:
            masks = answers[0][1]
            pred = masks.any(0) if len(masks) else np.zeros_like(gt)
            layers = [(m, True) for m in masks]
        else:  # SPEC §10: unparsable abstains, [] votes "no object", others one mask + score per object
            votes = [None if o is None else [(m, s, x['label'] or '') for x, m, s in zip(o, ms, ss)]
                     for o, ms, ss in answers[:n]]
            pred, clusters, reason = vote.majority_vote(votes, agg=agg, shape=gt.shape)
            pred = pred.cpu().numpy()
            layers = [(answers[c['members'][0][0]][1][c['members'][0][1]], c['kept']) for c in clusters]
        rec['curve'][str(n)] = pipeline.sample_iou(pred, gt, ign)
    rec['inter'], rec['union'] = rec['curve'][str(ns[-1])]
    rec.update(iou=rec['inter'] / rec['union'] if rec['union'] else 1.0, gt_empty=not gt.any(),
               pred_empty=not pred.any(), failed=sum(o is None for o, _, _ in answers), vote_reason=reason,
               clusters=[{k: c[k] for k in ('votes', 'score', 'label', 'kept')} for c in clusters])
    return rec, pred, layers


PALETTE = [(230, 25, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def overlay(image, gt, ignore, layers):
    """-> (H, 3W, 3) uint8: image | GT (rest dimmed; ignore grey) | prediction on the dimmed image
    (kept clusters filled in their colour, dropped ones faint; a cluster drawn by its first member)."""
    def tint(img, m, color, a):  # alpha-blend a colour into the pixels of mask m
        img[m] = (1 - a) * img[m] + a * np.asarray(color, float)
    g, pr = image * np.where(gt, 1.0, 0.3)[..., None], image * 0.5  # (H, W, 3) float
    if ignore is not None:
        tint(g, ignore, (128, 128, 128), 0.8)
    for k, (m, kept) in enumerate(layers):
        tint(pr, np.asarray(m, bool), PALETTE[k % len(PALETTE)], 0.6 if kept else 0.2)
    return np.concatenate([image, g.astype(np.uint8), pr.astype(np.uint8)], 1)


# ------------------------------------------------------------------ setup
ddp, rank, world_size, args.device = M.init_distributed(args.device)  # torchrun: shard, gather to rank 0
if ddp:
    import torch.distributed as dist
sandbox = args.model is None
if sandbox and args.adapter is None:
    args.adapter = next((f for f in (f'runs/stage{k}/last/adapter.safetensors' for k in (2, 1)) if os.path.isfile(f)), None)
meta = lora.read_lora(args.adapter)[1] if args.adapter else {}
base = args.model or meta.get('base') or ('sandbox/stage0' if os.path.isdir('sandbox/stage0') else 'runs/stage0/last')
if sandbox and not os.path.isdir(base):
    sys.exit(f'[eval] no sandbox checkpoint at {base}: run `python train.py --stage 0` first, or pass --model DIR')
net, proc = M.load_policy(base, device=args.device, adapter=args.adapter)
image_size = args.image_size or meta.get('image_size') or M.default_image_size(proc)
coord_mode = args.coord_mode or meta.get('coord_mode') or M.default_coord_mode(net)
max_new = args.max_new_tokens or (160 if sandbox else 2048)
template = M.load_template(args.prompt_file or 'eval', base)
seg = S.load_sam(args.sam, args.sam_type, args.device) if args.sam else S.ColorSegmenter()
if args.data and not args.sam and rank == 0:
    print('[eval] WARNING: --data without --sam: the colour segmenter only suits the synthetic world')
samples = data.load_dataset(args.data)[:args.n] if args.data else world.dataset('test', args.n or 200)
ns = sorted({int(x) for x in args.curve.split(',')} | {args.vote}) if args.curve else [args.vote]
N = ns[-1]  # samples drawn per query; every curve point votes on a prefix of them
tag = [q for q in os.path.abspath(args.adapter or base).split(os.sep) if q not in ('last', 'adapter.safetensors')][-1]
data_tag = os.path.basename(args.data.rstrip('/')) if args.data else 'world'
out = args.out or f'runs/eval/{tag}-{data_tag}-vote{N}'
if rank == 0:
    print(f'[eval] base {base} | adapter {args.adapter or "none"} | {len(samples)} samples ({args.data or "synthetic test"})')
    print(f'[eval] image {image_size} coords {coord_mode} | batch {args.batch} | ' +
          ('greedy' if N == 1 else f'{N} samples/query, T={args.temperature} top-p {args.top_p}, vote agg {args.agg}'))
    os.makedirs(out, exist_ok=True)
if args.save_vis:
    os.makedirs(args.save_vis, exist_ok=True)

# ------------------------------------------------------------------ generate, segment, vote, score
records, mine = [], shard(len(samples), args.batch, rank, world_size)
bar = tqdm(total=sum(len(idx) for _, idx in mine), desc='eval', disable=rank != 0)
for b, idx in mine:
    chunk = [samples[i] for i in idx]
    torch.manual_seed(args.seed + b)  # per batch: samples do not depend on which rank runs it
    rolls = pipeline.generate(net, proc, chunk, template, image_size, n=N, greedy=N == 1, temperature=args.temperature,
                              top_p=args.top_p, max_new_tokens=max_new, seed=args.seed, keys=idx)
    texts = [t for r in rolls for t in r.texts]
    lens = [n for r in rolls for n in r.mask.sum(1).tolist()]  # (B*N,) tokens up to and incl. the first EOS
    for j, (i, s) in enumerate(zip(idx, chunk)):
        txt = texts[j * N:(j + 1) * N]
        answers = pipeline.segment_answers(seg, s, txt, image_size, coord_mode)  # one decoder batch
        rec, pred, layers = score_query(s, answers, ns, args.agg)
        records.append(dict(index=i, id=s.id, query=s.query, reasoning_type=s.reasoning_type, **rec,
                            answers=txt, objects=[o for o, _, _ in answers], resp_len=lens[j * N:(j + 1) * N]))
        if args.save_vis and i < args.vis_n:
            Image.fromarray(overlay(s.image, s.gt_mask, s.ignore, layers)).save(
                os.path.join(args.save_vis, f'{i:05d}.png'))
    bar.update(len(idx))
bar.close()
if ddp:  # exact merge: every rank's per-sample sums go to rank 0, which aggregates once
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(records, parts, dst=0)
    records = [r for part in parts for r in part] if rank == 0 else []
    dist.destroy_process_group()
if rank != 0:
    sys.exit(0)

# ------------------------------------------------------------------ report (rank 0)
records.sort(key=lambda r: r['index'])
summary = summarize(records)
summary.update(base=base, adapter=args.adapter, data=args.data or 'world/test', image_size=image_size,
               coord_mode=coord_mode, batch=args.batch, vote=N, agg=args.agg, temperature=args.temperature,
               top_p=args.top_p, max_new_tokens=max_new, world_size=world_size)
if len(ns) > 1:
    summary['curve'] = {n: iou_stats([r['curve'][str(n)] for r in records]) for n in ns}  # vote on first n
row = lambda t, st: print(f"{t:<10}{st['n']:>6}{100 * st['gIoU']:>8.1f}{100 * st['cIoU']:>8.1f}")
print(f"\n{'type':<10}{'n':>6}{'gIoU':>8}{'cIoU':>8}")
for t, st in [('all', summary), *summary['per_type'].items()]:
    row(t, st)
noobj = 'n/a' if summary['no_object_acc'] is None else f"{100 * summary['no_object_acc']:.1f}%"
print(f"format failures {100 * summary['format_fail']:.1f}% | no-object accuracy {noobj} "
      f"({summary['n_no_object']} empty-GT samples) | mean response {summary['resp_len']:.1f} tokens")
with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
with open(os.path.join(out, 'samples.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
if len(ns) > 1:
    from matplotlib.figure import Figure  # renders with Agg, no pyplot / display needed
    print(f"\n{'votes':<10}{'n':>6}{'gIoU':>8}{'cIoU':>8}")
    for n, st in summary['curve'].items():
        row(n, st)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for key in ('gIoU', 'cIoU'):
        ax.plot(ns, [100 * summary['curve'][n][key] for n in ns], marker='o', label=key)
    ax.set_xscale('log', base=2)
    ax.set(xticks=ns, xticklabels=ns, xlabel='samples per query (majority vote)', ylabel='%', title=f'{tag} on {data_tag}')
    ax.legend(), fig.tight_layout(), fig.savefig(os.path.join(out, 'curve.png'))
print(f'[eval] wrote {out}/summary.json, samples.jsonl' + (', curve.png' if len(ns) > 1 else ''))
