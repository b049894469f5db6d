"""eval.py: StAR evaluation, greedy or with mask-level majority voting, as one script (method §10, §12).

  python eval.py                                  # sandbox: greedy on 1,000 synthetic test queries
  python eval.py --vote 8                         # 8 samples per query, voted; curve.png over 1, 2, 4, 8
  python eval.py --compare runs/eval/OTHER        # ... then the paired difference: this eval minus OTHER
  python eval.py --compare runs/eval/A runs/eval/B    # A minus B from their samples.jsonl; nothing runs
  torchrun --nproc_per_node 8 eval.py --model Qwen2.5-VL-7B --adapter runs/stage2/last/adapter.safetensors \\
      --sam sam_vit_h.pth --sam-type vit_h --data ReasonSeg-X/test --vote 8
Writes to the output folder: samples.jsonl (one line per query, appended as each batch finishes),
summary.json (gIoU, cIoU with 95% bootstrap intervals over queries: all, the reasoning aggregate of
the four ReasonSeg-X types, each type), vis/ (overlays of the first queries), curve.png (voting).
An earlier eval is never overwritten: the default folder takes the next free suffix (-2, -3, ...)
and says so; an explicit --out that holds an eval is refused.
Tested by: python -m pytest tests/test_eval.py tests/test_stats.py
"""
import argparse, errno, json, math, os, sys, time
import torch
from tqdm import tqdm

import data, inference, parallel, pipeline, stats, vis
from sandbox import world

TEST_SIZE = 1000  # synthetic test queries: a paired SE of about 1.5 points on the reasoning types

p = argparse.ArgumentParser(description=__doc__.split('Tested by')[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog='A bad flag, file or dataset is one line naming it, before any model loads.')
g = p.add_argument_group('common')
g.add_argument('--vote', type=int, default=1, metavar='N',
               help='samples per query: 1 = greedy, N > 1 = mask voting (method §10) (default: 1)')
g.add_argument('--curve', metavar='LIST', help='vote sizes, e.g. 1,2,4,8, all voted from one set of max-N samples '
               '(default with --vote N > 1: the powers of two up to N; voting costs little next to sampling)')
g.add_argument('--limit', '--n', dest='n', type=int, metavar='K', help='the first K queries (default: 1,000 '
               'synthetic, all of --data); under torchrun write --limit (torchrun takes --n as its own)')
g.add_argument('--batch', type=int, default=8, metavar='B',
               help='queries per generate call, fixed: padding changes greedy outputs (method §12) (default: 8)')
g.add_argument('--gen-chunk', type=int, metavar='R', help='rows (queries x samples) per generate call: bounds the KV '
               f'cache; the answers do not depend on it (default: {inference.GEN_CHUNK} with --model, fits an 80 GB '
               'GPU at 7B; all of a batch in the sandbox)')
g.add_argument('--temperature', type=float, default=1.0, metavar='T', help='sampling temperature (default: 1.0)')
g.add_argument('--top-p', type=float, default=0.9, metavar='P', help='nucleus sampling (default: 0.9)')
g.add_argument('--agg', default='best', choices=['best', 'consensus'],
               help='how a kept vote cluster becomes a mask (default: best)')
g.add_argument('--seed', type=int, default=0, metavar='S',
               help='sampling seed, per batch: sharding does not change it (default: 0)')
g.add_argument('--adapter', metavar='FILE',
               help='LoRA file (default without --model: runs/stage2/last, else runs/stage1/last)')
g.add_argument('--out', metavar='DIR',
               help='output folder (default: runs/eval/<checkpoint>-<data>-vote<N>, or -2, -3 ... if taken)')
g.add_argument('--save-vis', metavar='DIR', help='folder for the overlays (default: <out>/vis)')
g.add_argument('--vis-n', type=int, default=16, metavar='K', help='overlays of the first K queries (default: 16)')
g.add_argument('--compare', nargs='+', metavar='DIR', help='DIR: after this eval, the paired difference this minus '
               'DIR on the same queries; A B: A minus B from two finished evals, nothing generated')
g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', metavar='DEV',
               help='torch device (default: cuda if there is one, else cpu)')
g.add_argument('--shard', action='store_true', help='torchrun: shard the base over the ranks (FSDP2; README)')
g.add_argument('--rollout', default='hf', choices=['hf', 'vllm'], help='who samples: transformers\' generate (hf, '
               'default) or a vLLM engine in this process (vllm: README "Rollouts through vLLM")')
g.add_argument('--vllm-memory', type=float, metavar='F', help='--rollout vllm: the engine\'s share of the GPU '
               '(default: 0.5), on CPU the share of RAM for its KV cache (default: 0.05)')
g.add_argument('--vllm-tp', type=int, default=1, metavar='K', help='--rollout vllm: tensor-parallel size; above 1 '
               'under torchrun, each group of K ranks shares one engine (default: 1)')
r = p.add_argument_group('paper scale: a real checkpoint, SAM and data')
r.add_argument('--model', metavar='DIR', help='base checkpoint dir (default: the adapter\'s base, else sandbox/stage0)')
r.add_argument('--sam', metavar='PATH', help='transformers SAM 2 / 2.1 checkpoint DIR or segment-anything FILE '
               '(default: the world\'s colour segmenter)')
r.add_argument('--sam-type', default='vit_h', choices=['vit_b', 'vit_l', 'vit_h'], help='SAM size (default: vit_h)')
r.add_argument('--data', metavar='PATH', help='ReasonSeg folder or HF parquet/arrow rows (default: synthetic test)')
r.add_argument('--skip-bad', action='store_true', help='skip corrupt rows of --data, counted in one warning')
r.add_argument('--image-size', type=int, metavar='PX', help='model input side (default: adapter meta, else 840 '
               'or what the processor keeps)')
r.add_argument('--coord-mode', choices=['pixel', 'grid1000', 'unit', 'auto'],
               help='answer coordinates (default: adapter meta, else by model type)')
r.add_argument('--prompt-file', metavar='FILE', help="template with {question} (default: base's prompt.txt, else ours)")
r.add_argument('--max-new-tokens', type=int, metavar='T',
               help=f'longest response (default: 2048; sandbox {inference.SANDBOX_NEW_TOKENS})')
s = p.add_argument_group('sandbox (no --model): sandbox/stage0 + the newest runs/stage{2,1} adapter, synthetic test')
s.add_argument('--threads', type=int, metavar='K', help=f'CPU threads (default: {inference.SANDBOX_THREADS} in the '
               'sandbox, fixed: same command, same numbers; torch\'s own with --model)')
p.add_argument_group('limits', inference.limits_help('--vote', '--batch', '--vis-n', '--max-new-tokens',
                                                     '--image-size', '--threads', '--seed', '--gen-chunk',
                                                     '--vllm-tp') +
                     f'; --limit {inference.MOST["--limit"]:,} on the synthetic test (built in memory)')
p.error = lambda msg: p.exit(2, f'[eval] error: {msg} (python eval.py --help)\n')  # one line, not the usage
args = p.parse_args()


def fail(msg):
    inference.fail('eval', msg)


def read_eval(folder):
    """A finished (or interrupted) eval's samples.jsonl -> records; one line naming what is wrong."""
    path = os.path.join(folder, 'samples.jsonl')
    if not os.path.isfile(path):
        fail(f'--compare {folder}: no samples.jsonl there (not an eval output folder)')
    try:
        return [json.loads(line) for line in open(path) if line.strip()]
    except (ValueError, OSError) as e:
        fail(f'--compare {path}: not JSON lines ({e})')


def show_comparison(a, b, name_a, name_b, out=None):
    try:
        result = stats.paired(a, b)
    except ValueError as e:
        fail(f'--compare: {e}')
    print('\n' + stats.compare_table(result, name_a, name_b))
    if out:
        with open(os.path.join(out, 'compare.json'), 'w') as f:
            json.dump(dict(this=name_a, other=name_b, **result), f, indent=1)


def score_query(sample, answers, ns, agg='best'):
    """One query's segmented answers (pipeline.segment_answers) -> (record, final mask (H, W), layers
    to draw). ns: vote sizes, each voting on the first n answers; one answer alone is greedy."""
    gt, rec = sample.gt_mask, dict(curve={})
    for n in ns:
        pred, layers, clusters, reason = inference.combine(answers, n, agg, gt.shape)
        rec['curve'][str(n)] = pipeline.sample_iou(pred, gt, sample.ignore)
    rec['inter'], rec['union'] = rec['curve'][str(ns[-1])]
    rec.update(iou=rec['inter'] / rec['union'] if rec['union'] else 1.0, gt_empty=not gt.any(),
               pred_empty=not pred.any(), failed=sum(o is None for o, _, _ in answers), vote_reason=reason,
               clusters=[{k: c[k] for k in ('votes', 'score', 'label', 'kept')} for c in clusters])
    return rec, pred, layers


def shard(n_items, batch, rank, world_size):
    """Whole batches round-robin over ranks: every batch is the one a single process would run,
    so greedy outputs (which depend on padding) do not depend on the number of processes."""
    batches = [list(range(i, min(i + batch, n_items))) for i in range(0, n_items, batch)]
    return [(b, idx) for b, idx in enumerate(batches) if b % world_size == rank]


def parse_curve(text, vote):
    """--curve '1,2,4' (or None) -> sorted vote sizes including --vote; None with --vote N > 1 gives
    the powers of two below N, and N."""
    if text is None:
        return sorted({2 ** k for k in range(vote.bit_length()) if 2 ** k < vote} | {vote})
    try:
        sizes = {int(x) for x in text.split(',')}
    except ValueError:
        fail(f'--curve {text}: must be comma-separated whole numbers, e.g. 1,2,4,8')
    if min(sizes) < 1 or max(sizes) > inference.MOST['--vote']:
        fail(f'--curve {text}: vote sizes must be >= 1 and <= {inference.MOST["--vote"]:,}')
    return sorted(sizes | {vote})


def output_folder(explicit, default):
    """-> the folder this eval writes to, created and writable. An earlier eval (summary.json or a
    non-empty samples.jsonl) is never overwritten: an explicit --out holding one is refused, the
    default name moves on to the first free -2, -3, ... and says so."""
    used = lambda d: os.path.isfile(os.path.join(d, 'summary.json')) or (
        os.path.isfile(os.path.join(d, 'samples.jsonl')) and os.path.getsize(os.path.join(d, 'samples.jsonl')) > 0)
    out = explicit or default
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f'--out {out}: is a file, not a folder')
    if explicit and used(out):
        fail(f'--out {out}: holds an earlier eval (summary.json / samples.jsonl); pass a new folder or delete it')
    k = 1
    while not explicit and used(out):
        k += 1
        out = f'{default}-{k}'
    if out != (explicit or default):
        print(f'[eval] {default} holds an earlier eval: writing to {out} instead')
    return out


def writable(folder, flag):
    inference.check_out('eval', folder, flag)


# ------------------------------------------------------------------ 1. flags, nothing loaded yet
if args.compare and len(args.compare) > 2:
    fail(f'--compare takes one folder (this eval minus it) or two (A minus B), got {len(args.compare)}')
if args.compare and len(args.compare) == 2:  # standalone: two finished evals, no model
    show_comparison(read_eval(args.compare[0]), read_eval(args.compare[1]), *args.compare)
    sys.exit(0)
inference.check_ints('eval', [('--vote', args.vote, 1), ('--batch', args.batch, 1), ('--vis-n', args.vis_n, 0),
                               ('--gen-chunk', args.gen_chunk, 1),
                               ('--limit', args.n, 1, 10 ** 12 if args.data else inference.MOST['--limit']),
                               ('--max-new-tokens', args.max_new_tokens, 1), ('--image-size', args.image_size, 1),
                               ('--threads', args.threads, 1), ('--seed', args.seed, 0),
                               ('--vllm-tp', args.vllm_tp, 1)])
if args.vllm_memory is not None and not 0 < args.vllm_memory < 1:
    fail(f'--vllm-memory {args.vllm_memory}: must be in (0, 1)')
ns = parse_curve(args.curve, args.vote)
N = ns[-1]  # samples drawn per query; every curve point votes on a prefix of them
for flag, v in (('--temperature', args.temperature), ('--top-p', args.top_p)):  # NaN / inf: garbage answers
    if not math.isfinite(v):
        fail(f'{flag} {v}: must be a finite number')
if N > 1 and (not 0 < args.temperature <= 10 or not 0 < args.top_p <= 1):
    fail(f'--temperature {args.temperature} / --top-p {args.top_p}: sampling needs 0 < temperature <= 10 and '
         '0 < top-p <= 1')
if args.sam is not None and not os.path.exists(args.sam):
    fail(f'--sam {args.sam}: no such file or folder')
if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
    fail(f'--prompt-file {args.prompt_file}: no such file')
if args.data is not None and not os.path.exists(args.data):
    fail(f'--data {args.data}: no such file or folder')

# ------------------------------------------------------------------ 2. adapter, data, output folder
ddp, rank, world_size, args.device = parallel.init_distributed(args.device, args.shard, 'eval')  # torchrun: split
if ddp:
    import torch.distributed as dist
sandbox = args.model is None
base, adapter, meta = inference.resolve(args.model, args.adapter, 'eval')
untrained = sandbox and adapter is None  # no runs/stage{2,1} adapter: the shipped stage-0 base, before any RL
if untrained and rank == 0:
    print(f'[eval] WARNING: no trained adapter (runs/stage2, runs/stage1): this evaluates the UNTRAINED base {base} '
          '(stage 0, no RL); train first with `python train.py --stage 2`, or pass --adapter FILE', file=sys.stderr)
try:
    samples = data.load_dataset(args.data, args.skip_bad)[:args.n] if args.data else \
        world.dataset('test', args.n or TEST_SIZE)
except Exception as e:  # noqa: BLE001 - data.BadData names the file, row and field; others get their type
    fail('--data: ' + (str(e) if isinstance(e, (ValueError, OSError)) else f'{args.data}: {type(e).__name__}: {e}'))
other = read_eval(args.compare[0]) if args.compare else None
if other is not None:  # refuse now, not after the generation, when the queries differ
    try:
        stats.align([dict(id=x.id, query=x.query) for x in samples], other)
    except ValueError as e:
        fail(f'--compare {args.compare[0]}: {e}')
tag = [q for q in os.path.abspath(adapter or base).split(os.sep) if q not in ('last', 'adapter.safetensors')][-1]
data_tag = os.path.basename(args.data.rstrip('/')) if args.data else 'world'
out = vis_dir = None
if rank == 0:
    out = output_folder(args.out, f'runs/eval/{tag}-{data_tag}-vote{N}')
    writable(out, '--out')
    vis_dir = args.save_vis or os.path.join(out, 'vis')
    if args.vis_n:
        writable(vis_dir, '--save-vis')
if ddp:  # every rank writes its share next to rank 0's
    out, vis_dir = parallel.broadcast_object([out, vis_dir])
part_path = os.path.join(out, 'samples.jsonl' if world_size == 1 else f'samples.rank{rank}.jsonl')
os.makedirs(out, exist_ok=True)  # on another node without a shared filesystem the folder is not there yet
part = open(part_path, 'w')


def out_of_room(kind, e, tb):  # a full disk or an unwritable output mid-run: one line, not a traceback
    if issubclass(kind, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
        print(f'\n[eval] error: cannot write {e.filename or out} ({e.strerror}); the batches finished before are in '
              f'{part_path}', file=sys.stderr)
    else:
        sys.__excepthook__(kind, e, tb)


sys.excepthook = out_of_room

# ------------------------------------------------------------------ 3. model, segmenter, prompt
pol = inference.load('eval', base, adapter, meta, args.device, args.image_size, args.coord_mode, args.prompt_file,
                   args.sam, args.sam_type, args.threads, sandbox, shard=args.shard)
image_size, coord_mode = pol['image_size'], pol['coord_mode']
max_new = args.max_new_tokens or (inference.SANDBOX_NEW_TOKENS if sandbox else 2048)
gen_chunk = args.gen_chunk or (None if sandbox else inference.GEN_CHUNK)
engine = None
if args.rollout == 'vllm':  # the adapter, if any, is handed to the engine once
    engine = inference.vllm_engine('eval', pol, base, adapter, args.vllm_memory, args.vllm_tp, max_new, args.seed)
if args.data and not args.sam and rank == 0:
    print('[eval] WARNING: --data without --sam: the colour segmenter only suits the synthetic world')
if rank == 0:
    print(f'[eval] base {base} | adapter {adapter or "none"} | {len(samples)} queries '
          f'({args.data or "synthetic test"})')
    print(f'[eval] image {image_size} coords {coord_mode} | batch {args.batch} | {torch.get_num_threads()} threads | ' +
          ('greedy' if N == 1 else f'{N} samples/query, T={args.temperature} top-p {args.top_p}, vote agg {args.agg}'))

# ------------------------------------------------------------------ 4. generate, segment, vote, score
t0, records, mine = time.time(), [], shard(len(samples), args.batch, rank, world_size)
bar = tqdm(total=sum(len(idx) for _, idx in mine), desc='eval', disable=rank != 0)
if args.shard:  # FSDP2 (loaded sharded); its collectives need every rank to make as many generate calls: the
    # short ones rerun a batch
    mine += [(None, mine[-1][1] if mine else [0])] * (len(shard(len(samples), args.batch, 0, world_size)) - len(mine))
for b, idx in mine:
    chunk = [samples[i] for i in idx]
    rolls = (engine.generate if engine else pipeline.generate)(  # per-query sampling streams: batching, chunks and
        pol['net'], pol['proc'], chunk, pol['template'], image_size, n=N, greedy=N == 1,  # ranks change nothing
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new, seed=args.seed, keys=idx,
        chunk=gen_chunk)
    if b is None:  # --shard: a rerun to keep the ranks in step, not a result
        continue
    texts = [t for r in rolls for t in r.texts]
    lens = [n for r in rolls for n in r.mask.sum(1).tolist()]  # (B*N,) tokens up to and incl. the first EOS
    for j, (i, sample) in enumerate(zip(idx, chunk)):
        txt = texts[j * N:(j + 1) * N]
        answers = pipeline.segment_answers(pol['seg'], sample, txt, image_size, coord_mode)  # one decoder batch
        rec, pred, layers = score_query(sample, answers, ns, args.agg)
        records.append(dict(index=i, id=sample.id, query=sample.query, reasoning_type=sample.reasoning_type, **rec,
                            answers=txt, objects=[o for o, _, _ in answers], resp_len=lens[j * N:(j + 1) * N]))
        part.write(json.dumps(records[-1]) + '\n')
        if i < args.vis_n:
            think = ('(sample 1) ' if N > 1 else '') + vis.shorten(txt[0])
            vis.overlay(os.path.join(vis_dir, f'{i:05d}.png'), sample.image, layers, sample.query, think,
                        sample.gt_mask, sample.ignore, rec['iou'],
                        (f'type {sample.reasoning_type} · ' if sample.reasoning_type else '') + (
                            f'vote of {N}: {rec["vote_reason"]}' if N > 1 else 'greedy'), len(sample.masks),
                        unparsable=rec['failed'] == N)
    part.flush()  # a crash loses at most the batch in progress
    bar.update(len(idx))
bar.close()
part.close()
if ddp:  # exact merge: every rank's per-query sums go to rank 0, which aggregates once
    parts = parallel.gather_objects(records)
    records = [r for part in parts for r in part] if rank == 0 else []
    os.remove(part_path)  # each rank its own: the nodes need not share a filesystem
    parallel.barrier()  # nobody tears the group down while a peer's gather is in flight (gloo aborts)
    dist.destroy_process_group()
if rank != 0:
    sys.exit(0)

# ------------------------------------------------------------------ 5. report (rank 0)
records.sort(key=lambda r: r['index'])
if ddp:  # one samples.jsonl in query order (the rank parts are gone)
    with open(os.path.join(out, 'samples.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
summary = stats.summarize(records)
summary.update(base=base, adapter=adapter, data=args.data or 'world/test', image_size=image_size, coord_mode=coord_mode,
               batch=args.batch, vote=N, agg=args.agg, temperature=args.temperature, top_p=args.top_p,
               max_new_tokens=max_new, seed=args.seed, world_size=world_size, threads=torch.get_num_threads(),
               seconds=round(time.time() - t0, 1))
print('\n' + stats.table(stats.rows(summary)))
noobj = 'n/a' if summary['no_object_acc'] is None else f"{100 * summary['no_object_acc']:.1f}%"
print(f"format failures {100 * summary['format_fail']:.1f}% | no-object accuracy {noobj} "
      f"({summary['n_no_object']} empty-GT queries) | mean response {summary['resp_len']:.1f} tokens")
if len(ns) > 1:
    summary['curve'] = {str(n): stats.bootstrap([r['curve'][str(n)] for r in records]) for n in ns}
    print('\n' + stats.table([(n, st) for n, st in summary['curve'].items()], first='votes'))
    vis.plot_curve(summary['curve'], os.path.join(out, 'curve.png'), f'{tag} on {data_tag}')
with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
agg = summary['reasoning']
if agg:
    print(f"\n[eval] reasoning (P/F, C/KI, C/R, C/MH together, {agg['n']} queries): gIoU {100 * agg['gIoU']:.1f} "
          f"{stats.ci_text(agg['gIoU_ci'])}, cIoU {100 * agg['cIoU']:.1f} {stats.ci_text(agg['cIoU_ci'])}")
print(f"[eval] {len(records)} queries in {summary['seconds']:.0f} s | results in {out}/ (summary.json, samples.jsonl"
      + (', curve.png)' if len(ns) > 1 else ')') + (f' | overlays in {vis_dir}/' if args.vis_n else ''))
if untrained:  # said again under the table, where the numbers are read
    print(f'[eval] WARNING: these are the numbers of the UNTRAINED base {base} (no adapter, no RL)', file=sys.stderr)
if other is not None:
    show_comparison(records, other, out, args.compare[0], out)
