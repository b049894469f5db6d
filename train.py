"""train.py: StAR training, stages 0, 1 and 2, as one script read top to bottom (docs/method.md §6-9).

  stage 0  supervised warm-up of the tiny sandbox model (the sandbox's stand-in for a pretrained base;
           a real Qwen-VL skips it)
  stage 1  GRPO, stage-1 reward (format + grounding accuracy + non-repeat), G rollouts all used
  stage 2  REST: N rollouts sampled, the G extremes kept, stage-2 reward, continuing stage 1's adapter

  python train.py --stage 2                      # sandbox demo: runs any missing earlier stage first
  torchrun --nproc_per_node 8 train.py --stage 1 --model Qwen2.5-VL-7B --sam sam_vit_h.pth --data stage1.parquet
Tested by: python -m pytest tests/test_train.py
"""
import argparse, json, os, sys, time
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
a.add_argument('--kl-coef', type=float, default=0.0, help='k3 KL to the starting policy: the adapters-off base, '
               'or with --tuning full a frozen copy (StAR: 0; predecessors 5e-3 to 1e-2)')
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
    positive = dict(steps=args.steps, batch=args.batch, lora_r=args.lora_r, save_every=args.save_every,
                    micro_batch=args.micro_batch, max_new_tokens=args.max_new_tokens, eval_n=args.eval_n,
                    group=args.group, rollouts=args.rollouts, gen_chunk=args.gen_chunk, threads=args.threads)
    bad = [f'--{k.replace("_", "-")} {v}: must be >= 1' for k, v in positive.items() if v is not None and v < 1]
    bad += [f'--{k} {v}: must be > 0' for k, v in (('lr', args.lr), ('temperature', args.temperature),
                                                   ('lora-alpha', args.lora_alpha)) if v is not None and not v > 0]
    bad += [f'--top-p {args.top_p}: must be in (0, 1]'] if not 0 < args.top_p <= 1 else []
    bad += [f'--{k} {v}: must be >= 0' for k, v in (('eval-every', args.eval_every), ('kl-coef', args.kl_coef),
                                                    ('clip-eps', args.clip_eps), ('wd', args.wd),
                                                    ('entropy-coef', args.entropy_coef)) if v < 0]
    if args.stage > 0 and args.rollouts < args.group:
        bad.append(f'--rollouts {args.rollouts} < --group {args.group}: REST samples N >= the G it keeps')
    if set(families) - set(world.FAMILIES):
        bad.append(f'--families {args.families!r}: each must be one of {",".join(world.FAMILIES)}')
    if args.shard and args.tuning == 'full':
        bad.append('--shard shards a frozen base for LoRA; --tuning full trains the whole LM (one copy per rank)')
    if args.stage == 0 and (args.preset == 'paper' or args.shard):
        bad.append('--stage 0 trains the tiny sandbox base, whole; a real Qwen-VL (or --shard) starts at --stage 1')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        bad.append(f'--out {args.out}: is a file')
    if args.resume and not any(checkpoint.complete(os.path.join(args.out, 'last' + x)) for x in ('', '.tmp', '.old')):
        bad.append(f'--resume: no checkpoint in {args.out} to continue (it would start anew): leave out --resume, '
                   'or give the --out of the run to continue')
    if bad:
        sys.exit(f'[train] error: {bad[0]}')


def log(record):
    if rank == 0:
        with open(os.path.join(args.out, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')


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
os.makedirs(args.out, exist_ok=True)
ckpt = os.path.join(args.out, 'last')
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
    if not checkpoint.recover('runs/stage1/last') and rank == 0:
        run_earlier(1)
    if os.path.isfile(os.path.join('runs/stage1/last', update.META_FILE)):  # stage 1 tuned fully: go on from it
        base, args.init_adapter = 'runs/stage1/last', 'none'
    args.init_adapter = args.init_adapter or 'runs/stage1/last/adapter.safetensors'
resumed = checkpoint.prepare(ckpt, args.resume, rank)  # rank 0 repairs a half-done save, then all ranks look
try:  # data, paths and adapters first; each problem ends in one line, not a traceback
    train_set = data.load_dataset(args.data, args.skip_bad) if args.data else None
    proc = M.load_processor(base)
    args.image_size = args.image_size if size_given else min(args.image_size, M.default_image_size(proc))
    M.check_image_size(proc, args.image_size)
    net = M.load_model(base, update.weight_dtype(args.tuning), args.device, random_init=args.random_init)
    coord_mode = args.coord_mode or M.default_coord_mode(net)
    template = M.load_template(args.prompt_file or M.template_name(f'stage{args.stage}', not args.no_label), base)
    init = args.init_adapter if args.stage == 2 and args.init_adapter != 'none' else None  # full: merged in
    params, ref_net = update.setup(net, args.tuning, args.lora_r, args.lora_alpha, init, reference=args.kl_coef > 0)
    if args.resume and resumed:  # whole tensors: before any sharding
        update.load_weights(net, ckpt, args.tuning)
    seg = S.load_segmenter(args.sam, args.sam_type, args.device) if args.sam else S.ColorSegmenter()
    if str(args.device).startswith('cuda'):
        lora.enable_checkpointing(net)
    if args.shard:
        parallel.shard(net, args.device)
        params = lora.lora_parameters(net)  # the sharded parameters replace the whole ones
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.wd)
    start = 0
    if args.resume and resumed:
        start = checkpoint.restore(ckpt, opt, lr=args.lr)[0]
        if rank == 0:  # the steps after the checkpoint are rerun: their old records go
            checkpoint.truncate_log(os.path.join(args.out, 'log.jsonl'), start)
except (OSError, ValueError, RuntimeError) as e:
    sys.exit(f'[train] error: {e}')
val = [] if args.data else world.dataset('val', args.eval_n, families=target_families)  # real data: eval.py
N, G = args.rollouts, args.group  # sampled per prompt, kept for the update (REST when N > G)


def get_samples(step):
    """This rank's prompts of this step and their global ids: a function of (seed, step, rank)."""
    ids = [(step * world_size + rank) * args.batch + i for i in range(args.batch)]
    if not args.data:
        return [world.sample('train', i, families) for i in ids], ids
    n = len(train_set)  # a fresh permutation every epoch
    return [train_set[np.random.default_rng([args.seed, i // n]).permutation(n)[i % n]] for i in ids], ids


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


if args.eval_every and start == 0 and (rank == 0 or args.shard) and val:  # the start of the held-out curve
    log(dict(step=0, val_giou=pipeline.heldout_giou(net, proc, seg, val, template, args.image_size, coord_mode,
                                                    args.max_new_tokens)[0],
             val_queries=f'{len(val)} held-out queries: {", ".join(target_families)}'))  # curves.png says which
net.train()
done = saved = start  # steps finished, steps in the last checkpoint
paces, warned = [], False  # seconds per decoding step, against this run's first steps (pace.py)
try:
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f'stage {args.stage}',
                     disable=rank != 0):
        t0 = time.time()
        samples, ids = get_samples(step)
        # 1. rollouts: N per prompt, sampled with streams seeded by (seed, prompt id, sample index), so
        #    they do not depend on how prompts are sharded over ranks or rows chunked per generate call
        rolls = pipeline.generate(net, proc, samples, template, args.image_size, n=N, greedy=False,
                                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, keys=ids, chunk=args.gen_chunk)
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
            saved = save(done)
except KeyboardInterrupt:  # keep the finished steps: save them, say how to continue
    if (rank == 0 or args.shard) and done > saved:
        saved = save(done)
    again = ' '.join(['python', *sys.argv] + ([] if args.resume else ['--resume']))
    sys.exit(f'\n[train] interrupted after step {done}: checkpoint {ckpt} holds step {saved}; continue with: {again}')
if rank == 0:
    print(f'[train] stage {args.stage} done: {ckpt}')
parallel.finish()  # torchrun: the process group goes down before the interpreter does
