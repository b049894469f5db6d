"""warmup.py: stage 0, the supervised warm-up of the tiny sandbox model (teacher-forced answers) on
explicit grounding queries, reasoning queries with guessed meanings and bare-cue facts (world.py).
It stands in for the pretraining a real Qwen-VL already has; a real checkpoint starts at stage 1.
Run through `python train.py --stage 0`, which owns the flags, the log and the checkpoint folder.
Tested by: python -m pytest tests/test_train.py (test_stage0_trains_the_base)
"""
import math, os, time
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint, pipeline, world
import model as M
import segment as S

GUESS_BASE, FACT_BASE = 5_000_000, 7_000_000  # train indices: other scenes than the explicit ones


def run(args, config, ckpt, log, prompt):
    """Build (or resume) the tiny base and train all its weights; checkpoints go to `ckpt`."""
    resume = args.resume and os.path.isdir(ckpt)
    src = ckpt if resume else args.model or M.build_tiny_policy(
        os.path.join(args.out, 'init'), words=world.vocabulary(), seed=args.seed,
        image_size=args.image_size, prompt=prompt)
    net, proc = M.load_policy(src, device=args.device)
    template = M.load_template(args.prompt_file or 'stage1', src)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    start = checkpoint.restore(ckpt, opt) if resume else 0
    sched = lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps)))
    val, seg = world.dataset('val', args.eval_n, families=('explicit',)), S.ColorSegmenter()
    net.train()
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc='stage 0'):
        t0 = time.time()
        # explicit queries + reasoning queries with query-blind guessed meanings + bare-cue facts
        n_guess, n_fact, i0 = round(args.batch * args.guess_frac), round(args.batch * args.fact_frac), step * args.batch
        batch = (world.dataset('train', args.batch - n_guess - n_fact, families=('explicit',), start=i0)
                 + [world.sample('train', GUESS_BASE + i0 + i, world.FAMILIES[1:], guess=True) for i in range(n_guess)]
                 + [world.sample('train', FACT_BASE + i0 + i, ('fact',)) for i in range(n_fact)])
        b, labels = world.teacher_batch(proc, batch, template, args.image_size)  # labels -100 but the answer
        logits = net(**b.to(args.device)).logits[:, :-1].float()                 # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(args.device))
        for g in opt.param_groups:
            g['lr'] = args.lr * sched(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        rec = dict(step=step + 1, loss=loss.item(), lr=opt.param_groups[0]['lr'], grad_norm=gnorm.item(),
                   sec=time.time() - t0)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            rec['val_giou'], rec['val_example'] = pipeline.heldout_giou(
                net, proc, seg, val, template, args.image_size, 'pixel', args.max_new_tokens)
            tqdm.write(f"step {step + 1}: loss {rec['loss']:.3f} val gIoU {rec['val_giou']:.3f} | {rec['val_example'][:80]}")
        log(rec)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            checkpoint.save(ckpt, lambda d: (net.save_pretrained(d), proc.save_pretrained(d)), opt, step + 1, config, template)
    print(f'[train] stage 0 done: {ckpt}')
