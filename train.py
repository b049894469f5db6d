"""train.py: StAR training, stages 0, 1 and 2, as one script read top to bottom (docs/method.md §6-9).

  stage 0  supervised warm-up of the tiny sandbox model (the sandbox's stand-in for a pretrained base;
           a real Qwen-VL skips it)
  stage 1  GRPO, stage-1 reward (format + grounding accuracy + non-repeat), G rollouts all used
  stage 2  REST: N rollouts sampled, the G extremes kept, stage-2 reward, continuing stage 1's adapter

  python train.py --stage 2                      # sandbox demo: runs any missing earlier stage first
  torchrun --nproc_per_node 8 train.py --stage 1 --model Qwen2.5-VL-7B --sam sam_vit_h.pth --data stage1.parquet
Tested by: python -m pytest tests/test_train.py
"""
import argparse, json, math, os, signal, sys, time
import numpy as np
import torch
from tqdm import tqdm

import checkpoint, data, grpo, lora, pace, parallel, pipeline, rest, rewards, update, vis
from sandbox import warmup, world
import model as M
import segment as S

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog='stages:\n' + '\n'.join(x for x in __doc__.split('\n')[2:7] if x.strip()))
a = p.add_argument_group('common (a value left out comes from the preset: sandbox, or paper with --model)')
a.add_argument('--stage', type=int, default=2, choices=[0, 1, 2], help='training stage (default 2)')
a.add_argument('--model', help='local Qwen2/2.5/3-VL checkpoint dir (default: the shipped sandbox base)')
a.add_argument('--preset', choices=['sandbox', 'paper'], help='defaults: paper with --model, else sandbox')
a.add_argument('--data', help='training data: ReasonSeg folder or parquet/arrow rows (default: synthetic world)')
a.add_argument('--skip-bad', action='store_true', help='skip corrupt data rows (counted in one warning)')
a.add_argument('--sam', help='segmenter: a transformers SAM 2 / 2.1 checkpoint DIR (the paper: SAM 2.1 Hiera-L) or a '
               'segment-anything FILE (default: the colour segmenter of the world)')
a.add_argument('--sam-type', default='vit_h', choices=['vit_b', 'vit_l', 'vit_h'], help='SAM v1 FILE size (vit_h)')
a.add_argument('--init-adapter', help='stage 2: the stage-1 adapter.safetensors to continue (sandbox: runs/stage1); '
               '"none": a fresh adapter')
a.add_argument('--out', help='output dir (default runs/stage{N})')
a.add_argument('--resume', action='store_true', help='continue from the last checkpoint in --out')
a.add_argument('--steps', type=int, help='optimizer steps (sandbox 40 / 80; paper 323 / 150)')
a.add_argument('--batch', type=int, help='prompts per step and rank (paper: 16 in all; stage 0: samples)')
a.add_argument('--group', type=int, help='G: rollouts per prompt in the update (paper 16)')
a.add_argument('--rollouts', type=int, help='REST N: rollouts sampled per prompt; = --group is plain GRPO')
a.add_argument('--lr', type=float, help='learning rate (paper 1e-5 stage 1, 5e-6 stage 2)')
a.add_argument('--wd', type=float, default=1e-3, help='AdamW weight decay (1e-3)')
a.add_argument('--clip-eps', type=float, default=0.2, help='PPO clip range (0.2)')
a.add_argument('--kl-coef', type=float, default=0.0, help='k3 KL to the starting policy: the base, stage 2 the '
               'stage-1 adapter kept frozen, or with --tuning full a frozen copy (StAR: 0; predecessors 5e-3 to 1e-2)')
a.add_argument('--lora-r', type=int, help='LoRA rank (paper 64, sandbox 16)')
a.add_argument('--lora-alpha', type=float, help='LoRA alpha (paper 64, sandbox 32)')
a.add_argument('--temperature', type=float, default=1.0, help='rollout sampling temperature (1.0)')
a.add_argument('--top-p', type=float, default=1.0, help='rollout nucleus sampling (1.0)')
a.add_argument('--image-size', type=int, help='model input side (paper 840, sandbox 112)')
a.add_argument('--coord-mode', choices=['pixel', 'grid1000', 'unit', 'auto'], help='answer coordinates '
               '(pixel for Qwen2/2.5, auto for Qwen3)')
a.add_argument('--max-new-tokens', type=int, help='longest response (paper 2048, sandbox 160)')
a.add_argument('--prompt-file', help='prompt template with {question} (default: the base\'s prompt.txt, else ours)')
a.add_argument('--eval-every', type=int, help='held-out greedy gIoU every K steps, 0 never (sandbox 20)')
a.add_argument('--eval-n', type=int, default=64, help='held-out samples for that check (64)')
a.add_argument('--save-every', type=int, help='checkpoint every K steps (20)')
a.add_argument('--hard-below', type=float, metavar='R', help='stage 2 curriculum: train only on prompts the '
               'starting policy solves at a rate < R over --hard-k samples (a pre-pass; e.g. 0.125: never in 8)')
a.add_argument('--hard-k', type=int, default=8, help='--hard-below: samples per screened prompt (8)')
a.add_argument('--hard-pool', type=int, help='--hard-below: prompts screened, the first of the default order '
               '(default: one run\'s worth, steps x batch; --data: at most the dataset)')
a.add_argument('--seed', type=int, default=0, help='seed for data order, sampling and init (0)')
a.add_argument('--threads', type=int, help='CPU threads (sandbox 2, fixed so a rerun gives the same numbers)')
a.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
a = p.add_argument_group('ablations: each changes one thing (docs/method.md "Ablation flags")')
a.add_argument('--no-label', action='store_true', help='label-free prompt; format pays box + point only')
a.add_argument('--reward', default='star', choices=rewards.ACCURACIES, help='accuracy term: star (mask tiers '
               'via SAM, default) or visionreasoner (box/point checks only, 0-3, no SAM)')
a.add_argument('--tuning', default='lora', choices=update.TUNINGS, help='lora (default) or full: every '
               'language-model weight trains, the vision tower stays frozen')
a.add_argument('--entropy-coef', type=float, default=0.0, help='entropy bonus (StAR: 0; predecessors 1e-3)')
a = p.add_argument_group('memory (paper scale: the defaults fit an 80 GB GPU, README "The real thing")')
a.add_argument('--micro-batch', type=int, default=8, help='rollout rows per forward/backward (8)')
a.add_argument('--shard', action='store_true', help='torchrun: shard the base over the ranks (FSDP2; README)')
a.add_argument('--gen-chunk', type=int, help='rows (prompts x rollouts) per generate call (paper 64, '
               'sandbox all of a step); the rollouts do not depend on it')
a.add_argument('--rollout', default='hf', choices=['hf', 'vllm'], help='who samples the rollouts: transformers\' '
               'generate (hf, default) or a vLLM engine in this process (vllm: README "Rollouts through vLLM")')
a.add_argument('--vllm-memory', type=float, help='--rollout vllm: the engine\'s share of the GPU (0.3), on CPU the '
               'share of RAM for its KV cache (0.05)')
a.add_argument('--vllm-tp', type=int, default=1, help='--rollout vllm: tensor-parallel size of the engine (1); above 1 '
               'under torchrun, each group of that many ranks shares one engine')
a.add_argument('--random-init', action='store_true', help='random weights from --model\'s config.json '
               '(smoke tests of a real configuration, nothing to download)')
a = p.add_argument_group('sandbox only: stage 0 (the tiny base)')
a.add_argument('--families', help='world query families to train on (default: explicit in stage 1, the four '
               'reasoning types in stage 2)')
a.add_argument('--warmup', type=int, default=200, help='stage 0: linear warm-up steps, then cosine to 0.1x')
a.add_argument('--guess-frac', type=float, default=0.25,
               help='stage 0: share of reasoning queries with a guessed meaning')
a.add_argument('--fact-frac', type=float, default=0.25, help='stage 0: share of bare-cue facts ("grass" -> "green")')
a.add_argument('--vision-steps', type=int, default=0, help='stage 0: first train the tower on colour + shape heads')
a.add_argument('--attr-coef', type=float, default=0.0, help='stage 0: weight of that loss beside the language loss')
# Flag ranges, checked before anything loads (check_args): past them a value is a typo, or cannot fit a machine.
LIMITS = dict(steps=10 ** 7, save_every=10 ** 7, eval_every=10 ** 7, warmup=10 ** 7, vision_steps=10 ** 7,
              batch=4096, group=4096, rollouts=4096, micro_batch=4096, gen_chunk=4096, eval_n=4096, lora_r=1024,
              threads=1024, max_new_tokens=32768, image_size=3584, seed=2 ** 32 - 1, hard_k=1024,
              hard_pool=10 ** 7, vllm_tp=1024)  # integers: the most
RANGES = dict(lr=(0, 1), wd=(0, 1), clip_eps=(0, 1), kl_coef=(0, 10), entropy_coef=(0, 10), attr_coef=(0, 100),
              lora_alpha=(0, 65536), temperature=(0, 10), top_p=(0, 1), guess_frac=(0, 1), fact_frac=(0, 1))  # floats
ABOVE = ('lr', 'lora_alpha', 'temperature', 'top_p')  # must exceed their low end; the others may equal it
bounds = {}
for k, v in LIMITS.items():
    bounds.setdefault(v, []).append('--' + k.replace('_', '-'))
p.add_argument_group('limits', 'integer flags are at most: ' + '; '.join(f'{", ".join(f)} {v:,}' for v, f in
                                                                         bounds.items()) + '; --seed >= 0')
p.error = lambda msg: p.exit(2, f'[train] error: {msg} (python train.py --help)\n')  # one line, not the usage
args = p.parse_args()
config = vars(args)

# Presets: the sandbox (tiny model, synthetic world, CPU minutes), or the paper's settings (§6-8).
SANDBOX_BASE, SANDBOX_PROMPT = 'sandbox/stage0', 'find: {question}'  # README: the command that made the base
REASONING = ('P/F', 'C/KI', 'C/R', 'C/MH')
ddp, rank, world_size, args.device = parallel.init_distributed(args.device, args.shard)
paper_batch = max(1, 16 // world_size)  # method §6: 16 prompts per step in all, shared by the ranks
PAPER = {1: dict(batch=paper_batch, group=16, rollouts=16, lr=1e-5, lora_r=64, lora_alpha=64, steps=323),
         2: dict(batch=paper_batch, group=16, rollouts=256, lr=5e-6, lora_r=64, lora_alpha=64, steps=150)}
SANDBOX = {0: dict(batch=16, steps=9000, lr=1e-3, eval_every=1000, save_every=500),
           1: dict(batch=8, group=8, rollouts=8, lr=5e-4, lora_r=16, lora_alpha=32, steps=40),
           2: dict(batch=8, group=8, rollouts=16, lr=5e-4, lora_r=16, lora_alpha=32, steps=80)}
args.preset = args.preset or ('paper' if args.model and args.stage > 0 else 'sandbox')
size_given = args.image_size is not None
preset = (dict(image_size=840, max_new_tokens=2048, gen_chunk=64, **PAPER[args.stage]) if args.preset == 'paper'
          else dict(threads=2, **SANDBOX[args.stage]))
for k, v in {**dict(eval_every=20, save_every=20, image_size=112, max_new_tokens=160), **preset}.items():
    config[k] = v if config.get(k) is None else config[k]
args.out = args.out or f'runs/stage{args.stage}'
target_families = ('explicit',) if args.stage == 1 else REASONING  # what the stage is meant to improve
families = tuple(args.families.split(',')) if args.families else target_families


def check_args():
    """Every flag that can be checked before any work, each error one line naming the flag."""
    flag, bad = lambda k: '--' + k.replace('_', '-'), []  # noqa: E731
    for k, hi in LIMITS.items():  # integers: counts are >= 1
        v, lo = config.get(k), 0 if k in ('eval_every', 'vision_steps', 'seed') else 1
        if v is not None and not lo <= v <= hi:
            bad.append(f'{flag(k)} {v}: must be ' + (f'>= {lo}' if v < lo else f'<= {hi:,}'))
    for k, (lo, hi) in RANGES.items():  # floats: finite and in range (NaN compares false with everything)
        v = config[k]
        why = None if v is None else 'a finite number' if not math.isfinite(v) else \
            f'> {lo}' if k in ABOVE and v <= lo else f'>= {lo}' if v < lo else f'<= {hi}' if v > hi else None
        if why:
            bad.append(f'{flag(k)} {v}: must be {why}')
    if args.guess_frac + args.fact_frac > 1:
        bad.append(f'--guess-frac {args.guess_frac} + --fact-frac {args.fact_frac}: must be at most 1 together')
    if args.hard_below is not None and (args.stage != 2 or not 0 < args.hard_below <= 1):
        bad.append(f'--hard-below {args.hard_below}: a success rate in (0, 1], for --stage 2')
    if args.stage > 0 and args.rollouts < args.group:
        bad.append(f'--rollouts {args.rollouts} < --group {args.group}: REST samples N >= the G it keeps')
    if set(families) - set(world.FAMILIES):
        bad.append(f'--families {args.families!r}: each must be one of {",".join(world.FAMILIES)}')
    if args.rollout == 'vllm' and args.tuning == 'full':
        bad.append('--rollout vllm serves the LoRA adapter to the engine; --tuning full needs --rollout hf')
    if args.vllm_memory is not None and not 0 < args.vllm_memory < 1:
        bad.append(f'--vllm-memory {args.vllm_memory}: must be in (0, 1)')
    if args.shard and args.tuning == 'full':
        bad.append('--shard shards a frozen base for LoRA; --tuning full trains the whole LM (one copy per rank)')
    if args.stage == 0 and (args.preset == 'paper' or args.shard):
        bad.append('--stage 0 trains the tiny sandbox base, whole; a real Qwen-VL (or --shard) starts at --stage 1')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        bad.append(f'--out {args.out}: is a file')
    # nothing at all to resume (a last/ that is incomplete or a file is refused by checkpoint.check_folder, below)
    if args.resume and not any(os.path.exists(os.path.join(args.out, 'last' + x)) for x in ('', '.tmp', '.old')):
        bad.append(f'--resume: no checkpoint in {args.out} to continue (it would start anew): leave out --resume, '
                   'or give the --out of the run to continue')
    if bad:
        sys.exit(f'[train] error: {bad[0]}')


def log(record):
    if rank == 0:
        try:
            with open(os.path.join(args.out, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:  # disk full, unwritable: one line; the last checkpoint stays as it was
            sys.exit(f'[train] error: cannot append to {args.out}/log.jsonl ({e.strerror or e}); last checkpoint: '
                     f'{ckpt}')


def run_earlier(stage):
    """The sandbox demo is one command: run a missing earlier stage in a child process."""
    print(f'[train] stage {stage} output missing: running `python train.py --stage {stage}` first')
    import subprocess
    subprocess.run([sys.executable, sys.argv[0], '--stage', str(stage), '--device', args.device, '--seed',
                    str(args.seed)], check=True)


check_args()
torch.manual_seed(args.seed)
np.random.seed(args.seed)
if args.threads:
    torch.set_num_threads(args.threads)
ckpt = os.path.join(args.out, 'last')
try:  # before anything loads: a folder this run may write, one run per --out, a checkpoint it can continue
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        checkpoint.lock(args.out)
    checkpoint.check_folder(ckpt)
    if args.resume:  # the image side a flag left out is settled by the processor; --init-adapter by stage 1
        checkpoint.check_config(ckpt, config, skip=(() if size_given else ('image_size',)) +
                                (('init_adapter',) if args.init_adapter is None else ()))
except OSError as e:  # read-only, a file in the path
    sys.exit(f'[train] error: --out {args.out}: cannot write there ({e.strerror or e})')
except (ValueError, RuntimeError) as e:
    sys.exit(f'[train] error: {e}')
if rank == 0:
    print(f'[train] ===== stage {args.stage} ({args.preset} preset) -> {args.out} =====')

# ------------------------------------------------------------------ stage 0: supervised warm-up
if args.stage == 0:
    warmup.run(args, config, ckpt, log, SANDBOX_PROMPT)
    sys.exit(0)

# ------------------------------------------------------------------ stages 1-2: GRPO / REST
base = args.model or SANDBOX_BASE
if not args.model and not os.path.isdir(base) and rank == 0:
    run_earlier(0)
if args.stage == 2 and args.init_adapter is None:
    if args.model:
        sys.exit('[train] error: --stage 2 with --model needs --init-adapter FILE (the stage-1 adapter.safetensors; '
                 'none when --model is a fully tuned stage-1 checkpoint)')
    if not checkpoint.find('runs/stage1/last') and rank == 0:  # read only: stage 1's folder is another run's
        run_earlier(1)
    stage1 = checkpoint.find('runs/stage1/last') or 'runs/stage1/last'
    if os.path.isfile(os.path.join(stage1, update.META_FILE)):  # stage 1 tuned fully: go on from it
        base, args.init_adapter = stage1, 'none'
    args.init_adapter = args.init_adapter or os.path.join(stage1, 'adapter.safetensors')
resumed = checkpoint.prepare(ckpt, args.resume, rank)  # rank 0 repairs a half-done save, then all ranks look
try:  # data, paths and adapters first; each problem ends in one line, not a traceback
    train_set = data.load_dataset(args.data, args.skip_bad) if args.data else None
    proc = M.load_processor(base)
    args.image_size = args.image_size if size_given else min(args.image_size, M.default_image_size(proc))
    M.check_image_size(proc, args.image_size)
    init = args.init_adapter if args.stage == 2 and args.init_adapter != 'none' else None  # full: merged in
    if args.shard:  # each rank builds and reads only its shards (adapters too), never the whole model
        adapters = lambda n: lora.apply_lora(n, r=args.lora_r, alpha=args.lora_alpha,  # noqa: E731
                                             reference=args.kl_coef > 0 and init is not None)
        net = parallel.load_sharded(base, None, args.device, adapters, lora.initial, args.random_init)
    else:
        net = M.load_model(base, update.weight_dtype(args.tuning), args.device, random_init=args.random_init)
    coord_mode = args.coord_mode or M.default_coord_mode(net)
    template = M.load_template(args.prompt_file or M.template_name(f'stage{args.stage}', not args.no_label), base)
    params, ref_net = update.setup(net, args.tuning, args.lora_r, args.lora_alpha, init, reference=args.kl_coef > 0)
    if args.resume and resumed:  # (--shard: each rank takes its part of the whole tensors)
        update.load_weights(net, ckpt, args.tuning)
    seg = S.load_segmenter(args.sam, args.sam_type, args.device) if args.sam else S.ColorSegmenter()
    if str(args.device).startswith('cuda'):
        lora.enable_checkpointing(net)
    engine = None
    if args.rollout == 'vllm' and args.stage > 0:  # after the adapter is set up: the engine takes its dtype
        import rollout_vllm
        try:
            engine = rollout_vllm.Engine(base, net, args.vllm_memory or (0.3 if net.device.type == 'cuda' else 0.05),
                                         args.vllm_tp, rollout_vllm.context_length(net, args.image_size,
                                                                                   args.max_new_tokens), args.seed)
        except (OSError, ValueError, RuntimeError) as e:
            raise RuntimeError(f'--rollout vllm: {e}') from None
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.wd)
    # a save writes the new checkpoint beside the last one: a disk too small is said now, not at the first save
    checkpoint.check_space(args.out, sum(q.numel() * q.element_size() for q in (
        params if args.tuning == 'lora' else net.parameters())) + 2 * sum(q.numel() * 4 for q in params))  # + Adam
    start = 0
    if args.resume and resumed:
        start = checkpoint.restore(ckpt, opt, lr=args.lr)[0]
    if rank == 0:  # the steps after the checkpoint are rerun (all of them from step 0): their old records go
        checkpoint.truncate_log(os.path.join(args.out, 'log.jsonl'), start)
except (OSError, ValueError, RuntimeError) as e:
    sys.exit(f'[train] error: {e}')
val = [] if args.data else world.dataset('val', args.eval_n, families=target_families)  # real data: eval.py
N, G = args.rollouts, args.group  # sampled per prompt, kept for the update (REST when N > G)


def draw(i, items=None):
    """The prompt with global id i: a fresh world scene, or an epoch-wise permutation of `items` (the
    dataset, or the ids of the --hard-below pool)."""
    if items is None and not args.data:
        return world.sample('train', i, families)
    items = train_set if items is None else items
    n = len(items)  # a fresh permutation every epoch
    return items[np.random.default_rng([args.seed, i // n]).permutation(n)[i % n]]


def get_samples(step):
    """This rank's prompts of this step and their global ids: a function of (seed, step, rank)."""
    ids = [(step * world_size + rank) * args.batch + i for i in range(args.batch)]
    if hard is not None:  # --hard-below: drawn from the pool, each a prompt of the default order
        return [draw(draw(i, hard)) for i in ids], ids
    return [draw(i) for i in ids], ids


def screen():
    """--hard-below, once before stage 2 (method §9: REST can only rescue a prompt whose success is rare):
    K rollouts of each of the first P prompts of the default order from the starting policy, with the
    rollout and reward code of the training step, and the ids of those solved at a rate below R.
    Saved to <out>/hard_pool.json; a pool there screened with the same settings is reused (--resume,
    or a copy shared between runs that start from the same adapter)."""
    path = os.path.join(args.out, 'hard_pool.json')
    per = args.batch * world_size  # screened a step's worth at a time: every rank makes the same calls
    n = args.hard_pool or args.steps * per
    n = -(-min(n, len(train_set) if args.data else n) // per) * per  # --data: at most one epoch; whole steps
    settings = dict(init_adapter=args.init_adapter, data=args.data, families=list(families), seed=args.seed,
                    k=args.hard_k, candidates=n, below=args.hard_below, reward=args.reward, label=not args.no_label,
                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved['settings'] != settings:
            sys.exit(f'[train] error: {path} was screened with other settings ({saved["settings"]}); '
                     f'move it away to screen again')
        return saved['pool']
    t0, mine = time.time(), {}
    for c in tqdm(range(n // per), desc='screening', disable=rank != 0):
        ids = [(c * world_size + rank) * args.batch + i for i in range(args.batch)]
        samples = [draw(i) for i in ids]
        rolls = pipeline.generate(net, proc, samples, template, args.image_size, n=args.hard_k, greedy=False,
                                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, keys=[SCREEN_KEYS + i for i in ids], chunk=args.gen_chunk)
        for i, r, s in zip(ids, rolls, samples):  # streams apart from the training step's (keys = ids)
            mine[i] = (s.id, [bool(x['correct']) for _, x in rewards.score_group(
                r.texts, s, seg, args.stage, (args.image_size,) * 2, coord_mode, key=s.id, accuracy=args.reward,
                label=not args.no_label)])
    found = {i: v for part in parallel.gather_objects(mine) for i, v in part.items()}
    success = torch.tensor([found[i][1] for i in range(n)])                                     # (P, K)
    keep = rest.hard_prompts(success, args.hard_below).tolist()
    if not keep:
        sys.exit(f'[train] error: --hard-below {args.hard_below}: none of the {n} screened prompts is solved '
                 f'that rarely (pass@{args.hard_k} {rest.pass_at(success, args.hard_k):.2f}); raise it')
    k8 = min(8, args.hard_k)
    record = dict(step=0, screen_seconds=time.time() - t0, screen_rollouts=n * args.hard_k, screened=n,
                  pool_size=len(keep), screened_rate=success.float().mean().item(),
                  pool_rate=success[keep].float().mean().item(),  # in-sample: the samples that chose the pool
                  screened_successes=torch.bincount(success.sum(1), minlength=args.hard_k + 1).tolist(),
                  **{f'screened_pass{k8}': rest.pass_at(success, k8),
                     f'pool_pass{k8}': rest.pass_at(success[keep], k8)})
    if rank == 0:
        print(f'[train] screened {n} prompts x {args.hard_k} rollouts in {record["screen_seconds"]:.0f} s: '
              f'{len(keep)} solved at a rate < {args.hard_below} (pass@{k8} {record[f"pool_pass{k8}"]:.2f}, '
              f'all screened {record[f"screened_pass{k8}"]:.2f})')
        log(record)
        with open(path + '.tmp', 'w') as f:
            json.dump(dict(settings=settings, **record, pool=keep,
                           prompts={i: v for i, v in sorted(found.items())}), f)
        os.replace(path + '.tmp', path)
    return keep


def save(step):  # --shard: called by every rank (the adapter and optimizer state are gathered whole)
    meta = dict(base=base, stage=args.stage, image_size=args.image_size, coord_mode=coord_mode, step=step,
                label=not args.no_label, reward=args.reward, tuning=args.tuning)  # eval.py / predict.py read them
    if args.tuning == 'lora':
        checkpoint.save_adapter(ckpt, net, opt, meta, config, template, write=rank == 0)
    elif rank == 0:
        write = lambda folder: update.save_weights(net, proc, folder, args.tuning, meta)  # noqa: E731
        checkpoint.save(ckpt, write, opt, step, config, template)
    if rank == 0:
        vis.plot_training_curves(os.path.join(args.out, 'log.jsonl'), os.path.join(args.out, 'curves.png'))
    return step


def save_or_stop(step):  # disk full, unwritable: one line, and the last checkpoint stays as it was
    try:
        return save(step)
    except OSError as e:
        sys.exit(f'[train] error: saving step {step}: {e.strerror or e}' + (f' ({e.filename})' if e.filename else ''))


def stop(signum, frame):  # SIGTERM (what SLURM and Kubernetes send before preemption) is handled like Ctrl-C
    raise KeyboardInterrupt(signal.Signals(signum).name)



SCREEN_KEYS = 1 << 40  # --hard-below: the screening rollouts' sampling streams, apart from training's
hard = screen() if args.hard_below is not None else None  # ids of the prompts stage 2 draws from
if args.eval_every and start == 0 and (rank == 0 or args.shard) and val:  # the start of the held-out curve
    log(dict(step=0, val_giou=pipeline.heldout_giou(net, proc, seg, val, template, args.image_size, coord_mode,
                                                    args.max_new_tokens)[0],
             val_queries=f'{len(val)} held-out queries: {", ".join(target_families)}'))  # curves.png says which
net.train()
signal.signal(signal.SIGTERM, stop)
done = saved = start  # steps finished, steps in the last checkpoint
paces, warned = [], False  # seconds per decoding step, against this run's first steps (pace.py)
try:
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f'stage {args.stage}',
                     disable=rank != 0):
        t0 = time.time()
        samples, ids = get_samples(step)
        # 1. rollouts: N per prompt, sampled with streams seeded by (seed, prompt id, sample index), so
        #    they do not depend on how prompts are sharded over ranks or rows chunked per generate call
        if engine is not None:  # --rollout vllm: the engine gets this step's adapter (the update recomputes log-probs)
            engine.sync(net)
        rolls = (engine or pipeline).generate(net, proc, samples, template, args.image_size, n=N, greedy=False,
                                              temperature=args.temperature, top_p=args.top_p,
                                              max_new_tokens=args.max_new_tokens, seed=args.seed, keys=ids,
                                              chunk=args.gen_chunk)
        t_gen = time.time() - t0
        # 2. rewards: the N rollouts of a prompt share one image embedding and batched decoder calls
        scored = [rewards.score_group(r.texts, s, seg, args.stage, (args.image_size,) * 2, coord_mode, key=s.id,
                                      accuracy=args.reward, label=not args.no_label) for r, s in zip(rolls, samples)]
        reward = torch.tensor([[total for total, _ in g] for g in scored])                 # (B, N)
        success = torch.tensor([[c['correct'] for _, c in g] for g in scored])             # (B, N)
        # 3. REST keeps the G extremes of N (plain GRPO when N == G); advantages over the kept only
        kept = rest.select(reward, G)                                                      # (B, G)
        adv = grpo.group_advantages(reward.gather(1, kept))                                # (B, G)
        t_rew = time.time() - t0 - t_gen
        # 4. loss: PPO-clip, token mean over every kept response token of the step, on all ranks
        n_tok = parallel.all_reduce(torch.tensor(float(sum(r.mask[k].sum() for r, k in zip(rolls, kept))),
                                                 device=args.device), args.device)
        opt.zero_grad(set_to_none=True)
        losses = [update.policy_loss(net, r, k, a, n_tok, args.micro_batch, args.clip_eps, ref_net, args.kl_coef,
                                     args.entropy_coef, every_row=args.shard) for r, k, a in zip(rolls, kept, adv)]
        stats = [st for _, sts in losses for st in sts]
        # 5. step: gradients summed over ranks; a non-finite loss or gradient stops every rank together
        parallel.all_reduce_grads(params, args.device)
        loss = parallel.all_reduce(torch.tensor(sum(x for x, _ in losses), device=args.device), args.device)
        gnorm = parallel.full(torch.nn.utils.clip_grad_norm_(params, 1.0))  # --shard: the shards' norms combined
        if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
            sys.exit(f'[train] non-finite loss/gradient at step {step + 1}: stopped on every rank; '
                     f'last good checkpoint: {ckpt}')
        opt.step()
        # an update that left a weight NaN / inf (which the checks above cannot see) stops every rank before
        # anything is saved: the last checkpoint stays the last good one
        bad = torch.stack([~torch.isfinite(q.to_local() if parallel.is_sharded(q) else q).all() for q in params]).any()
        if parallel.all_reduce(torch.tensor(float(bad), device=args.device), args.device, op='max').item():
            sys.exit(f'[train] non-finite weights after step {step + 1}: stopped on every rank before saving; '
                     f'last good checkpoint: {ckpt} (step {saved})')
        # 6. log (rollout numbers over all ranks; REST stats are rank 0's share)
        comps = [dict(c, total=r) for part in parallel.gather_objects([x for g in scored for x in g])
                 for r, c in part]
        mean = lambda key: float(np.mean([c[key] for c in comps]))  # noqa: E731
        record = dict(step=step + 1, loss=loss.item(), reward=mean('total'), format=mean('format'),
                      accuracy=mean('accuracy'), non_repeat=mean('non_repeat'), correct=mean('correct'),
                      format_ok=float(np.mean([c['format'] >= 3 for c in comps])),
                      resp_len=float(np.mean([r.mask.sum(1).float().mean().item() for r in rolls])),
                      grad_norm=gnorm.item(), t_generate=t_gen, t_reward=t_rew,
                      t_update=time.time() - t0 - t_gen - t_rew, **rest.rest_stats(reward, kept, G, success),
                      **{k: float(np.mean([s[k] for s in stats])) if stats else 0.0
                         for k in ('clip_frac', 'kl') + (('entropy',) if args.entropy_coef > 0 else ())})
        if hard is not None:  # which pool prompts this step trained on (this rank's share)
            record['pool_prompts'] = [s.id for s in samples]
        if torch.cuda.is_available() and str(args.device).startswith('cuda'):
            record['peak_mem_gb'] = torch.cuda.max_memory_allocated() / 2 ** 30
        if args.eval_every and (step + 1) % args.eval_every == 0 and (rank == 0 or args.shard) and val:
            record['val_giou'], example = pipeline.heldout_giou(net, proc, seg, val, template, args.image_size,
                                                                coord_mode, args.max_new_tokens)
            if rank == 0:
                tqdm.write(f"step {step + 1}: reward {record['reward']:.2f} correct {record['correct']:.2f} "
                           f"val gIoU {record['val_giou']:.3f} | {example[:70]}")
        log(record)
        paces.append(pace.pace(t_gen, max(int(r.mask.sum(1).max()) for r in rolls)))
        slow = None if warned else pace.slowdown(paces)
        if slow and rank == 0:  # once: a busy machine, not the model, is what makes this run slow
            warned, cpu = True, not str(args.device).startswith('cuda')
            tqdm.write(f'[train] WARNING: step {step + 1} ran {slow:.0f}x slower per generated token than this '
                       f'run\'s first steps: the machine looks oversubscribed (load average {os.getloadavg()[0]:.1f} '
                       f'on {os.cpu_count()} cores)' + (
                           f'. With {torch.get_num_threads()} threads a busy CPU costs far more than its share: '
                           f'--threads 1 ran {pace.ONE_THREAD} here beside a CPU hog (README "Measured speed")'
                           if cpu and torch.get_num_threads() > 1 else ''), file=sys.stderr)
        done = step + 1
        if (rank == 0 or args.shard) and (done % args.save_every == 0 or done == args.steps):
            saved = save_or_stop(done)
except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: keep the finished steps, save them, say how to continue
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM does not cut the save short
    why = str(e) or 'SIGINT'
    if (rank == 0 or args.shard) and done > saved:
        saved = save_or_stop(done)
    again = ' '.join(['python', *sys.argv] + ([] if args.resume else ['--resume']))
    print(f'\n[train] {why}: interrupted after step {done}: checkpoint {ckpt} holds step {saved}; continue with: '
          f'{again}', file=sys.stderr)
    sys.exit(128 + getattr(signal, why, signal.SIGINT))
if rank == 0:
    print(f'[train] stage {args.stage} done: {ckpt}')
parallel.finish()  # torchrun: the process group goes down before the interpreter does
