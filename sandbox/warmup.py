"""sandbox/warmup.py: stage 0, the supervised warm-up of the tiny sandbox model (teacher-forced answers) on
explicit grounding queries, reasoning queries with guessed meanings and bare-cue facts (world.py).
It stands in for the pretraining a real Qwen-VL already has; a real checkpoint starts at stage 1.
Optionally (`--vision-steps`, `--attr-coef`) the vision tower first learns object colour and shape
from linear heads on its merged tokens, and keeps doing so beside the language loss: the language
loss alone leaves shape nearly unreadable in the tiny tower (README: the linear-probe finding).
Run through `python train.py --stage 0`, which owns the flags, the log and the checkpoint folder.
Tested by: python -m pytest tests/test_train.py -k stage0 (the base trains; the attribute heads resume exactly)
"""
import math, os, time
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint, pipeline, vis
from sandbox import tiny, world
import model as M
import segment as S

GUESS_BASE, FACT_BASE, ATTR_BASE, AUX_BASE = 5_000_000, 7_000_000, 8_000_000, 9_000_000  # train scenes per purpose
N_ATTR = len(world.COLORS) + len(world.SHAPES)  # the attribute head's logits: colours, then shapes


def attribute_loss(net, head, batch):
    """Colour + shape cross-entropy of a linear head on each object's centre visual token (the
    merger's output, what the language model reads); -> loss, shape accuracy."""
    b, idx, col, shp = batch
    dev = next(net.parameters()).device  # the processor's tensors come back on the CPU
    v = net.model.visual(b['pixel_values'].to(dev), grid_thw=b['image_grid_thw'].to(dev))  # (tokens, hidden)
    v = v if torch.is_tensor(v) else v.pooler_output if hasattr(v, 'pooler_output') else v[0]
    logits = head(v[idx.to(v.device)]).float()                                 # (n_obj, 5 + 4)
    nc = len(world.COLORS)
    loss = F.cross_entropy(logits[:, :nc], col.to(v.device)) + F.cross_entropy(logits[:, nc:], shp.to(v.device))
    return loss, (logits[:, nc:].argmax(1).cpu() == shp).float().mean().item()


def pretrain_vision(net, head, proc, args):
    """--vision-steps of the tower + merger alone on the attribute heads (AdamW 1e-3, 32 scenes)."""
    params = list(net.model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for step in tqdm(range(args.vision_steps), desc='stage 0 vision'):
        batch = world.attribute_batch(proc, 'train', ATTR_BASE + 32 * step, 32, args.image_size)
        loss, _ = attribute_loss(net, head, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    held = world.attribute_batch(proc, 'val', 0, 200, args.image_size)
    with torch.no_grad():
        print(f'[train] vision tower: held-out shape accuracy {attribute_loss(net, head, held)[1]:.3f}')


def run(args, config, ckpt, log, prompt):
    """Build (or resume) the tiny base and train all its weights; checkpoints go to `ckpt`."""
    resume = args.resume and checkpoint.recover(ckpt) is not None
    src = ckpt if resume else args.model or tiny.build_tiny_policy(
        os.path.join(args.out, 'init'), words=world.vocabulary(), seed=args.seed,
        image_size=args.image_size, prompt=prompt)
    net, proc = M.load_policy(src, device=args.device)
    template = M.load_template(args.prompt_file or 'stage1', src)
    head = torch.nn.Linear(net.config.vision_config.out_hidden_size, N_ATTR).to(args.device)
    if resume and os.path.isfile(os.path.join(ckpt, 'attr_head.pt')):
        head.load_state_dict(torch.load(os.path.join(ckpt, 'attr_head.pt')))
    elif args.vision_steps and not resume:
        pretrain_vision(net, head, proc, args)
    groups = [{'params': list(net.parameters())}] + ([{'params': list(head.parameters())}] if args.attr_coef else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    start = checkpoint.restore(ckpt, opt, lr=None)[0] if resume else 0
    checkpoint.truncate_log(os.path.join(args.out, 'log.jsonl'), start)  # one record per step, as train.py
    def save_weights(d):  # the attribute head only when it trains beside the LM (resume needs it)
        net.save_pretrained(d), proc.save_pretrained(d)
        if args.attr_coef:
            torch.save(head.state_dict(), os.path.join(d, 'attr_head.pt'))

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
        total, rec = loss, {}
        if args.attr_coef:  # keep colour and shape readable in the visual tokens (8 scenes per step)
            attr, rec['shape_acc'] = attribute_loss(
                net, head, world.attribute_batch(proc, 'train', AUX_BASE + 8 * step, 8, args.image_size))
            total, rec['attr_loss'] = loss + args.attr_coef * attr, attr.item()
        for g in opt.param_groups:
            g['lr'] = args.lr * sched(step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        rec = dict(step=step + 1, loss=loss.item(), lr=opt.param_groups[0]['lr'], grad_norm=gnorm.item(),
                   sec=time.time() - t0, **rec)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            rec['val_queries'] = f'{len(val)} held-out queries: explicit'  # curves.png says which
            rec['val_giou'], rec['val_example'] = pipeline.heldout_giou(
                net, proc, seg, val, template, args.image_size, 'pixel', args.max_new_tokens)
            tqdm.write(f"step {step + 1}: loss {rec['loss']:.3f} val gIoU {rec['val_giou']:.3f} | "
                       f"{rec['val_example'][:80]}")
        log(rec)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            checkpoint.save(ckpt, save_weights, opt, step + 1, config, template)
            vis.plot_training_curves(os.path.join(args.out, 'log.jsonl'), os.path.join(args.out, 'curves.png'))
    print(f'[train] stage 0 done: {ckpt}')
