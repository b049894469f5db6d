"""train.py: StAR training, stages 0, 1 and 2, as one script read top to bottom (SPEC §6-9).

  stage 0  supervised warm-up of the tiny sandbox model on explicit grounding (the sandbox's
           stand-in for a pretrained base; a real Qwen-VL skips it)
  stage 1  GRPO, stage-1 reward (format + grounding accuracy + non-repeat), G rollouts all used
  stage 2  REST: N rollouts sampled, M kept (extremes), stage-2 reward, continuing stage 1's adapter

  python train.py --stage 2                      # sandbox demo: runs any missing earlier stage first
  torchrun --nproc_per_node 8 train.py --stage 1 --model Qwen2.5-VL-7B --sam sam_vit_h.pth \\
      --sam-type vit_h --data stage1.parquet ... # see README for the paper-scale command lines
Tested by: python -m pytest tests/test_train.py
"""
import argparse, json, math, os, sys, time
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint, data, grpo, lora, pipeline, rest, rewards, warmup, world
import model as M
import segment as S

p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument('--stage', type=int, default=2, choices=[0, 1, 2], help='training stage (see above)')
p.add_argument('--model', default=None, help='local Qwen-VL checkpoint dir (default: the sandbox model; stage 0: a tiny base to continue)')
p.add_argument('--preset', default=None, choices=['sandbox', 'paper'], help='default settings (default: paper with --model, else sandbox)')
p.add_argument('--data', default=None, help='training data (data.load_dataset; default: synthetic world)')
p.add_argument('--sam', default=None, help='segment-anything checkpoint file (default: colour segmenter)')
p.add_argument('--sam-type', default='vit_h', choices=['vit_b', 'vit_l', 'vit_h'], help='SAM size')
p.add_argument('--init-adapter', default=None, help='stage 2: the stage-1 LoRA to continue (default: runs/stage1)')
p.add_argument('--out', default=None, help='output dir (default: runs/stage{N})')
p.add_argument('--steps', type=int, default=None, help='optimizer steps (default: per stage, sandbox)')
p.add_argument('--batch', type=int, default=None, help='prompts (stage 1-2) or samples (stage 0) per step and rank')
p.add_argument('--group', type=int, default=None, help='G: rollouts per prompt used for the update (SPEC §6: 16)')
p.add_argument('--rollouts', type=int, default=None, help='REST N: rollouts sampled per prompt; = G means plain GRPO (SPEC §9: 256 for 7B)')
p.add_argument('--lr', type=float, default=None, help='learning rate (default: per stage)')
p.add_argument('--wd', type=float, default=1e-3, help='AdamW weight decay (SPEC §6)')
p.add_argument('--clip-eps', type=float, default=0.2, help='PPO clip range')
p.add_argument('--kl-coef', type=float, default=0.0, help='k3 KL to the adapters-off base (StAR: 0)')
p.add_argument('--lora-r', type=int, default=None, help='LoRA rank (SPEC §7: 64; sandbox 16)')
p.add_argument('--lora-alpha', type=float, default=None, help='LoRA alpha (SPEC §7: 64; sandbox 32)')
p.add_argument('--temperature', type=float, default=1.0, help='rollout sampling temperature')
p.add_argument('--top-p', type=float, default=1.0, help='rollout nucleus sampling')
p.add_argument('--families', default=None, help='synthetic world: comma-separated query families to train on, each equally often (default: explicit in stage 1, the four reasoning types in stage 2)')
p.add_argument('--micro-batch', type=int, default=16, help='rows per forward/backward')
p.add_argument('--warmup', type=int, default=200, help='stage 0: linear warm-up steps, then cosine to 0.1x')
p.add_argument('--guess-frac', type=float, default=0.25, help='stage 0: share of reasoning queries with a query-blind guessed meaning')
p.add_argument('--vision-steps', type=int, default=0, help='stage 0: first train the vision tower alone on object colour + shape heads')
p.add_argument('--attr-coef', type=float, default=0.0, help='stage 0: weight of that colour + shape loss beside the language loss')
p.add_argument('--fact-frac', type=float, default=0.25, help='stage 0: share of bare-cue facts ("grass" -> think "green")')
p.add_argument('--image-size', type=int, default=None, help='model input side (SPEC §3: 840; sandbox 112)')
p.add_argument('--coord-mode', default=None, choices=['pixel', 'grid1000', 'unit', 'auto'], help='answer coordinates (default: pixel for Qwen2/2.5, auto for Qwen3)')
p.add_argument('--max-new-tokens', type=int, default=None, help='longest response (SPEC §6: 2048; sandbox 160)')
p.add_argument('--prompt-file', default=None, help='prompt template with {question} (default: the checkpoint\'s, else ours)')
p.add_argument('--eval-every', type=int, default=None, help='held-out greedy gIoU every K steps (0: never)')
p.add_argument('--eval-n', type=int, default=64, help='held-out samples for that evaluation')
p.add_argument('--save-every', type=int, default=None, help='checkpoint every K steps')
p.add_argument('--resume', action='store_true', help='continue from the last checkpoint in --out')
p.add_argument('--seed', type=int, default=0, help='seed for data order, sampling and init')
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
args = p.parse_args()
config = vars(args)

# torch.distributed: one process per GPU under torchrun; rank 0 logs and saves
ddp, rank, world_size, args.device = M.init_distributed(args.device)

# Sandbox defaults (tiny model, synthetic world, CPU minutes); paper values apply with --model.
SANDBOX_BASE = 'sandbox/stage0'   # the shipped stage-0 tiny base (README: the command that made it)
SANDBOX_PROMPT = 'find: {question}'
REASONING = ('P/F', 'C/KI', 'C/R', 'C/MH')
paper_batch = max(1, 16 // world_size)  # SPEC §6: 16 prompts per step in all, shared by the ranks
target_families = ('explicit',) if args.stage == 1 else REASONING  # what the stage is meant to improve
families = tuple(args.families.split(',')) if args.families else target_families
if set(families) - set(world.FAMILIES):
    sys.exit(f'[train] error: --families {args.families!r}: each must be one of {",".join(world.FAMILIES)}')
PAPER = {1: dict(batch=paper_batch, group=16, rollouts=16, lr=1e-5, lora_r=64, lora_alpha=64, steps=323),
         2: dict(batch=paper_batch, group=16, rollouts=256, lr=5e-6, lora_r=64, lora_alpha=64, steps=150)}
SANDBOX = {0: dict(batch=16, steps=9000, lr=1e-3, eval_every=1000, save_every=500),
           1: dict(batch=8, group=8, rollouts=8, lr=5e-4, lora_r=16, lora_alpha=32, steps=40),
           2: dict(batch=8, group=8, rollouts=16, lr=5e-4, lora_r=16, lora_alpha=32, steps=80)}
args.preset = args.preset or ('paper' if args.model and args.stage > 0 else 'sandbox')
if args.stage == 0 and args.preset == 'paper':  # stage 0 --model DIR continues a tiny base
    sys.exit('--stage 0 trains the tiny sandbox base only; a real Qwen-VL starts at --stage 1')
size_given = args.image_size is not None
for k, v in {**dict(eval_every=20, save_every=20, image_size=112, max_new_tokens=160), **(
        dict(image_size=840, max_new_tokens=2048, **PAPER[args.stage]) if args.preset == 'paper'
        else SANDBOX[args.stage])}.items():
    if config.get(k) is None:
        config[k] = v
args.out = args.out or f'runs/stage{args.stage}'

torch.manual_seed(args.seed)
np.random.seed(args.seed)
os.makedirs(args.out, exist_ok=True)
log_file = open(os.path.join(args.out, 'log.jsonl'), 'a') if rank == 0 else None
ckpt = os.path.join(args.out, 'last')


def log(rec):
    if log_file:
        log_file.write(json.dumps(rec) + '\n')
        log_file.flush()


def run_earlier(stage):
    """The sandbox demo is one command: run a missing earlier stage in a child process."""
    print(f'[train] stage {stage} output missing: running `python train.py --stage {stage}` first')
    import subprocess
    subprocess.run([sys.executable, sys.argv[0], '--stage', str(stage), '--device', args.device], check=True)


# ------------------------------------------------------------------ stage 0: supervised warm-up
if args.stage == 0:
    warmup.run(args, config, ckpt, log, SANDBOX_PROMPT)
    sys.exit(0)

# ------------------------------------------------------------------ stages 1-2: GRPO / REST
base = args.model or (SANDBOX_BASE if os.path.isdir(SANDBOX_BASE) else 'runs/stage0/last')
if not args.model and not os.path.isdir(base) and rank == 0:
    run_earlier(0)
if args.stage == 2 and args.init_adapter is None:
    if args.model:
        sys.exit('--stage 2 with --model needs --init-adapter FILE (the stage-1 adapter.safetensors)')
    args.init_adapter = 'runs/stage1/last/adapter.safetensors'
    if not os.path.isfile(args.init_adapter) and rank == 0:
        run_earlier(1)
try:  # bad paths and mismatched adapters end in one clear line, not a traceback
    net, proc = M.load_policy(base, device=args.device)
    coord_mode = args.coord_mode or M.default_coord_mode(net)
    if not size_given:  # a preset's 840 would be shrunk by a processor that keeps fewer pixels
        args.image_size = min(args.image_size, M.default_image_size(proc))
    template = M.load_template(args.prompt_file or f'stage{args.stage}', base)
    lora.apply_lora(net, r=args.lora_r, alpha=args.lora_alpha)
    if args.stage == 2:
        if not os.path.isfile(args.init_adapter):
            raise FileNotFoundError(f'--init-adapter {args.init_adapter!r} does not exist')
        lora.load_lora(net, args.init_adapter)  # refuses an adapter of another rank / target set
    seg = S.load_sam(args.sam, args.sam_type, args.device) if args.sam else S.ColorSegmenter()
    train_set = data.load_dataset(args.data) if args.data else None
except (OSError, ValueError, RuntimeError) as e:
    sys.exit(f'[train] error: {e}')
if str(args.device).startswith('cuda'):
    lora.enable_checkpointing(net)
params = lora.lora_parameters(net)
opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.wd)
start = 0
if args.resume and os.path.isdir(ckpt):
    lora.load_lora(net, os.path.join(ckpt, 'adapter.safetensors'))
    start = checkpoint.restore(ckpt, opt)
val = [] if args.data else world.dataset('val', args.eval_n, families=target_families)  # real data: eval.py
N, G = args.rollouts, args.group  # sampled per prompt, kept for the update (REST when N > G)


def get_samples(step):
    """This rank's prompts of this step and their global ids: a function of (seed, step, rank)."""
    ids = [(step * world_size + rank) * args.batch + i for i in range(args.batch)]
    if not args.data:
        return [world.sample('train', i, families) for i in ids], ids
    n = len(train_set)  # a fresh permutation every epoch
    return [train_set[np.random.default_rng([args.seed, i // n]).permutation(n)[i % n]] for i in ids], ids


if args.eval_every and start == 0 and rank == 0 and val:  # the starting point of the held-out curve
    log(dict(step=0, val_giou=pipeline.heldout_giou(net, proc, seg, val, template, args.image_size, coord_mode,
                                                    args.max_new_tokens)[0]))
net.train()
for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f'stage {args.stage}',
                 disable=rank != 0):
    t0 = time.time()
    samples, ids = get_samples(step)
    # 1. rollouts: N samples per prompt from one generate call, adapters on, no grad. Seeding by the
    #    prompt's global id makes them independent of how prompts are sharded over ranks.
    groups = []
    for s, gid in zip(samples, ids):
        torch.manual_seed(args.seed * 1_000_000_007 + gid)
        groups.append(pipeline.generate(net, proc, [s], template, args.image_size, n=N, greedy=False,
                                        temperature=args.temperature, top_p=args.top_p,
                                        max_new_tokens=args.max_new_tokens))  # inputs, (N, T), (N, R), texts
    t_gen = time.time() - t0
    # 2. rewards: the N rollouts of a prompt share one image embedding and one decoder batch
    scored = [rewards.score_group(g[3], s, seg, args.stage, (args.image_size,) * 2, coord_mode, key=s.id)
              for g, s in zip(groups, samples)]
    R = torch.tensor([[r for r, _ in g] for g in scored])                               # (B, N)
    comps = [dict(c, total=r) for g in scored for r, c in g]
    success = torch.tensor([[c['correct'] for _, c in g] for g in scored])              # (B, N)
    # 3. REST keeps the G extremes of N (plain GRPO when N == G); advantages over the kept only
    idx = rest.select(R, G)                                                             # (B, G)
    adv = grpo.group_advantages(R.gather(1, idx))                                       # (B, G)
    t_rew = time.time() - t0 - t_gen
    # 4. loss: PPO-clip, token-level mean over every kept response token of the step (all ranks)
    n_tok = torch.tensor(float(sum(g[2][idx[j][adv[j] != 0]].sum() for j, g in enumerate(groups))))
    if ddp:
        dist.all_reduce(n_tok)
    opt.zero_grad(set_to_none=True)
    stats, loss_sum = [], 0.0
    for j, (b, seqs, resp_mask, _) in enumerate(groups):
        live = adv[j] != 0                                   # a constant group contributes nothing
        rows, a = idx[j][live], adv[j][live]
        for k in range(0, len(rows), args.micro_batch):
            r, n = rows[k:k + args.micro_batch], len(rows[k:k + args.micro_batch])
            prompt_mask = b['attention_mask'].expand(n, -1)                             # (n, P)
            mb = dict(input_ids=seqs[r], attention_mask=torch.cat([prompt_mask, resp_mask[r].long()], 1),
                      response_mask=torch.cat([torch.zeros_like(prompt_mask), resp_mask[r].long()], 1).bool(),
                      image_grid_thw=b['image_grid_thw'].expand(n, -1), pixel_values=b['pixel_values'].repeat(n, 1))
            logp = grpo.token_logprobs(net, mb, micro_batch=n)                         # (n, T) fp32
            ref = None
            if args.kl_coef > 0:  # the reference is the same network with the adapters off
                with torch.no_grad(), lora.lora_disabled(net):
                    ref = grpo.token_logprobs(net, mb, micro_batch=n)
            # one optimizer step per rollout batch: the old policy is the current one (ratio 1, SPEC §6)
            loss, st = grpo.grpo_loss(logp, logp.detach(), a[k:k + n].to(logp.device), mb['response_mask'],
                                      args.clip_eps, ref, args.kl_coef)
            w = mb['response_mask'].sum().item() / n_tok.item()
            (loss * w).backward()
            loss_sum += loss.item() * w
            stats.append(st)
    if not math.isfinite(loss_sum):
        sys.exit(f'[train] non-finite loss at step {step + 1} (prompts {[s.id for s in samples]}); '
                 f'last good checkpoint: {ckpt}')
    for q in params:
        q.grad = torch.zeros_like(q) if q.grad is None else q.grad
        if ddp:  # each rank holds its share of the global token mean: sum them
            dist.all_reduce(q.grad)
    gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()  # on every rank, even one whose own groups were all flat: the gradient is global
    # 5. log (rollout numbers over all ranks; REST stats are rank 0's share)
    if ddp:
        shards = [None] * world_size
        dist.all_gather_object(shards, comps)
        comps = [c for sh in shards for c in sh]
    mean = lambda key: float(np.mean([c[key] for c in comps]))
    rec = dict(step=step + 1, loss=loss_sum, reward=mean('total'), format=mean('format'),
               accuracy=mean('accuracy'), non_repeat=mean('non_repeat'), correct=mean('correct'),
               format_ok=float(np.mean([c['format'] >= 3 for c in comps])),
               resp_len=float(np.mean([g[2].sum(1).float().mean().item() for g in groups])),
               grad_norm=gnorm.item(), t_generate=t_gen, t_reward=t_rew, t_update=time.time() - t0 - t_gen - t_rew,
               **rest.rest_stats(R, idx, G, success),
               **{k: float(np.mean([s[k] for s in stats])) if stats else 0.0 for k in ('clip_frac', 'kl')})
    if args.eval_every and (step + 1) % args.eval_every == 0 and rank == 0 and val:
        rec['val_giou'], ex = pipeline.heldout_giou(net, proc, seg, val, template, args.image_size,
                                                    coord_mode, args.max_new_tokens)
        tqdm.write(f"step {step + 1}: reward {rec['reward']:.2f} correct {rec['correct']:.2f} "
                   f"val gIoU {rec['val_giou']:.3f} | {ex[:70]}")
    log(rec)
    if rank == 0 and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
        meta = dict(base=base, stage=args.stage, image_size=args.image_size, coord_mode=coord_mode, step=step + 1)
        checkpoint.save(ckpt, lambda d: lora.save_lora(net, os.path.join(d, 'adapter.safetensors'), meta),
                        opt, step + 1, config, template)
if rank == 0:
    print(f'[train] stage {args.stage} done: {ckpt}')
