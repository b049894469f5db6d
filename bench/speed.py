"""bench/speed.py: what our design choices buy, as RATIOS of our way to the straightforward (or the reference's)
way on identical inputs, run side by side (interleaved, medians over repeats) so a busy machine slows both
alike; each comparison also checks both sides agree. 1 rewards: one SAM encode per image + one decoder
batch vs set_image per rollout (method §4). 2 voting: one Gram matrix vs a per-pair loop (§10). 3 GRPO step:
KL reference = adapters off vs a model copy (§6). 4 LoRA vs full fine-tuning (§7). 5 rollouts in one generate call.
7 rollouts by a vLLM engine vs generate (--rollout vllm; run in the vLLM environment, requirements-vllm.txt).
6 sandbox wall times from runs/*/log.jsonl. bench/scale.py has the figures at the real model's sizes, and
bench/memory.py the memory of --shard. A measurement, not a test:
OMP_NUM_THREADS=1 nice -n 19 python -m bench.speed [--quick] [--only reward,vote,...]"""
import argparse, contextlib, copy, datetime, functools, glob, itertools, json, os, statistics, sys, tempfile, time
os.environ.setdefault('KINETO_LOG_LEVEL', '6')  # silence the CPU memory profiler's per-call chatter
import numpy as np
import torch
import transformers

import data, grpo, lora, pipeline, rewards, segment, vote
from sandbox import world
from sandbox.tiny import build_tiny_policy
import model as M

Q, REPS, T0 = False, 7, time.time()  # --quick: fewer repeats and smaller sizes (set by run)
KL, PROMPT = 5e-3, 'find: {question}'  # the predecessors' k3 coefficient (method §6); the sandbox prompt
transformers.utils.logging.disable_progress_bar()
rows = []  # (figure, ours, baseline, ratio, target, met)

def race(fns, n=None, warm=True):
    """An untimed warm-up round (if warm), then n (default REPS) rounds each running every fn once, in
    turn. -> (median wall seconds per fn, each fn's last result)."""
    outs, ts = [f() if warm else None for f in fns], [[] for _ in fns]
    for _ in range(n or REPS):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            outs[i] = f()
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts], outs

once = lambda fn: [x[0] for x in race([fn], 1, warm=False)]  # -> (seconds, result) of one run

def add(fig, ours, base='—', ratio='—', target='—', met=None):
    rows.append((fig, ours, base, ratio, target, '—' if met is None else 'yes' if met else '**no**'))
    print(' | '.join(rows[-1]), flush=True)

nbytes = lambda net: sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])

def peak_mb(fn, device, resident=0):
    """`resident` (the weights held) + the peak MB of torch tensors allocated minus freed while fn runs:
    on CUDA from the allocator's high-water mark, on CPU from the running sum of the profiler's events."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (resident + torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                key=lambda e: e.start_ns())
    return (resident + max(itertools.accumulate((e.nbytes() for e in ev), initial=0))) / 2 ** 20

def bench_reward():  # both segmenters, random weights: SAM v1 vit_b, and the paper's SAM 2.1 Hiera-L (method §4)
    from segment_anything import sam_model_registry
    from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor

    torch.manual_seed(0)
    reward_ratio(segment.SamSegmenter(sam_model_registry['vit_b'](checkpoint=None).eval()), 'vit_b SAM')
    hiera_l = Sam2Model(segment.hiera_l_config()).eval()
    reward_ratio(segment.Sam2Segmenter(hiera_l, Sam2Processor(Sam2ImageProcessor())), 'SAM 2.1 Hiera-L')

def reward_ratio(seg, name):
    rng, (H, W), k = np.random.default_rng(0), (480, 640), 1 if Q else 2
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    ys, xs = np.ogrid[:H, :W]  # 3 GT boxes side by side, (3, H, W)
    gt = np.stack([(ys >= 100) & (ys < 200) & (xs >= 50 + 200 * i) & (xs < 150 + 200 * i) for i in range(3)])
    sample = data.Sample(id='bench', image=img, query='q', masks=gt)
    def text():  # one rollout: 3 objects jittered around the GT, coordinates in image pixels
        objs = [{'label': 'x', 'bbox_2d': [50 + 200 * i + x, 100 + y, 150 + 200 * i + x, 200 + y],
                 'point_2d': [100 + 200 * i + x, 150 + y]}
                for i, (x, y) in enumerate(rng.integers(-20, 21, (3, 2)).tolist())]
        return f'<think>t</think><answer>{json.dumps(objs)}</answer>'
    texts = [text() for _ in range(64)]
    calls, real = [], seg.predict_batch  # record every decoder output, to compare the two paths
    seg.predict_batch = lambda b, q: calls.append(real(b, q)) or calls[-1]
    def naive(t):  # the reference: set_image (= an encode) per rollout, one decoder call per object
        objs = M.to_original(M.parse_answer(t), (W, H), (W, H))
        seg.set_image(img)
        masks = np.stack([seg.predict_batch([o['bbox_2d']], [o['point_2d']])[0][0] for o in objs])
        return rewards.reward(t, sample, masks, 2, objects=objs)
    ours = lambda G: rewards.score_group(texts[:G], sample, seg, 2, (W, H), key=f'G{G}')  # new key: encodes
    # One vit_b encode takes ~30 s on one busy core: each side runs once (no repeats), the naive
    # path on k rollouts only, scaled linearly to G (it is G identical encodes + 3G decoder calls).
    t16, got = once(lambda: ours(16))
    batched, enc0 = calls[-1][0], seg.encoder_calls
    per = [once(lambda: naive(t)) for t in texts[:k]]  # (seconds, reward) per rollout
    t_naive, n_enc = statistics.median(t for t, _ in per), seg.encoder_calls - enc0
    diff = sum(int((c[0][0] != b).sum()) for c, b in zip(calls[-3 * k:], batched[:3 * k]))
    same = diff == 0 and all(r == o for (_, r), o in zip(per, got))
    add(f'1. {name}: masks and rewards identical (first {k} rollouts)', 'yes' if same else f'**no** ({diff} px differ)')
    for G in (16,) if Q else (16, 64):
        t = t16 if G == 16 else once(lambda: ours(64))[0]
        base, tgt = t_naive * G, 10 if G == 16 else 30
        add(f'1. reward scoring, G={G} × 3 objects, {name} (random weights), 640×480 image',
            f'{t:.1f} s (1 encode, decoder chunks of {seg.chunk})',
            f'{base:.0f} s = {t_naive:.1f} s × {G} (median of {k} rollouts: {n_enc} encodes, '
            f'{3 * k} decoder calls; scaled)',
            f'{base / t:.1f}×', f'≥ {tgt}×', base / t >= tgt)

def bench_vote():
    from tests.test_vote import reference_vote
    rng, S = np.random.default_rng(0), 512 if Q else 1024
    yy, xx = np.ogrid[:S, :S]
    bases = rng.uniform([.2 * S, .2 * S, .05 * S, .05 * S], [.8 * S, .8 * S, .15 * S, .15 * S], (3, 4))
    def obj(j, b):  # a jittered copy of base ellipse j; 15% of the time a small spurious one
        y, x, ry, rx = (b + rng.integers(-3, 4, 4) if rng.random() > .15
                        else rng.uniform([0, 0, 5, 5], [S, S, .05 * S, .05 * S]))
        return torch.from_numpy(((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1), float(rng.random()), f'obj{j}'
    samples = [[obj(j, b) for j, b in enumerate(bases)] for _ in range(32)]  # 32 × 3 (mask (S, S), score, label)
    (t, t_ref), (ours, ref) = race([lambda: vote.majority_vote(samples), lambda: reference_vote(samples)],
                                   2 if Q else 5)
    same = np.array_equal(ours[0].numpy(), ref[0])
    add(f'2. majority_vote, 32 samples × 3 objects, {S}², output identical: {"yes" if same else "**no**"}',
        f'{t * 1e3:.0f} ms', f'{t_ref * 1e3:.0f} ms (tests/test_vote.reference_vote)', f'{t_ref / t:.1f}×',
        '≤ 50 ms, ≥ 10×', t <= 0.05 and t_ref / t >= 10 and same)

@functools.cache
def tiny_dir():  # one tiny random Qwen2.5-VL checkpoint per run; tiny() loads a fresh copy of it
    return build_tiny_policy(tempfile.mkdtemp(prefix='bench_'), words=world.vocabulary(), prompt=PROMPT)

tiny = lambda: M.load_policy(tiny_dir())

def rollout_batch(proc, n):
    """n world samples; teacher answers stand in for rollouts (the last tokens of each left-padded row)."""
    ss = world.dataset('val', n)
    ans = [world.answer_text(s, (112, 112)) for s in ss]
    b = M.make_inputs(proc, [data.resize_for_model(s.image, 112) for s in ss],
                      [M.build_prompt(s.query, PROMPT) for s in ss], ans)
    n = torch.tensor([[len(proc.tokenizer(a + '<|im_end|>', add_special_tokens=False).input_ids)]
                      for a in ans])  # (B, 1)
    return dict(b, response_mask=torch.arange(b['input_ids'].shape[1]).flip(0) < n)  # (B, T): the last n[b] tokens

def update(net, batch, kl=0.0, ref_net=None):
    """A GRPO update as in train.py; KL reference: `ref_net` (a second model) if given, else adapters off."""
    net.zero_grad(set_to_none=True)
    mb = len(batch['input_ids'])
    logp, ref = grpo.token_logprobs(net, batch, micro_batch=mb), None  # (B, T) fp32
    if kl:
        with torch.no_grad(), lora.lora_disabled(net) if ref_net is None else contextlib.nullcontext():
            ref = grpo.token_logprobs(net if ref_net is None else ref_net, batch, micro_batch=mb)
    adv = torch.linspace(-1, 1, len(logp), device=logp.device)  # (B,)
    grpo.grpo_loss(logp, logp.detach(), adv, batch['response_mask'], ref_logp=ref, kl_coef=kl)[0].backward()
    return ref

def bench_grpo(net=None, batch=None, tag=None, reps=REPS):
    """Rows 3a-c: the update without KL, with KL via adapters off, with KL via a deepcopy reference model.
    On the tiny model unless given one (bench_gpu gives the 7B)."""
    if net is None:
        (net, proc), B = tiny(), 8 if Q else 16
        batch, tag = rollout_batch(proc, B), f'tiny model, {B} rollouts'
    dev = batch['input_ids'].device
    ref_net = copy.deepcopy(net).requires_grad_(False)  # the reference's way: a frozen second model
    lora.apply_lora(net, *[64 if dev.type == 'cuda' else 16] * 2)  # r = alpha: method §7 on the 7B, the sandbox's
    for _, m in lora.lora_modules(net):  # non-zero B, so that adapters on and off really differ
        m.lora_B.data.normal_(0, 0.02)
    if dev.type == 'cuda':  # as train.py runs on GPU
        lora.enable_checkpointing(net), net.train()
    same = torch.equal(update(net, batch, KL), update(net, batch, KL, ref_net))
    variants, mem = ((0.0,), (KL,), (KL, ref_net)), []
    for a in variants:
        net.zero_grad(set_to_none=True)  # grads are freed before the window, then counted inside it
        mem.append(peak_mb(lambda: update(net, batch, *a), dev, nbytes(net) + (nbytes(ref_net) if a[1:] else 0)))
    t = race([lambda a=a: update(net, batch, *a) for a in variants], reps)[0]
    add(f'3a. GRPO step peak memory, KL (adapters off) vs no KL, {tag}',
        f'{mem[1]:.0f} MB', f'{mem[0]:.0f} MB', f'{mem[1] / mem[0]:.2f}×', '≤ 1.1×', mem[1] / mem[0] <= 1.1)
    add(f'3b. … vs KL with a deepcopy reference model; ref log-probs identical: {"yes" if same else "**no**"}',
        f'{mem[1]:.0f} MB', f'{mem[2]:.0f} MB (+{nbytes(ref_net) / 2 ** 20:.0f} MB weights)',
        f'{mem[2] / mem[1]:.2f}× less')
    add(f'3c. GRPO step time, KL (adapters off) vs no KL, {tag}', f'{t[1] * 1e3:.0f} ms',
        f'{t[0] * 1e3:.0f} ms (deepcopy ref: {t[2] * 1e3:.0f} ms)', f'{t[1] / t[0]:.2f}× time')

def bench_lora():
    (full, proc), (net, _) = tiny(), tiny()
    full.requires_grad_(True)
    share = lora.apply_lora(net, r=16, alpha=16)[1] / sum(q.numel() for q in net.parameters())
    batch = rollout_batch(proc, 8 if Q else 16)
    t_l, t_f = race([lambda: update(net, batch), lambda: update(full, batch)])[0]
    add('4. LoRA r=16 vs full fine-tuning: step time (fwd+bwd), trainable share, tiny model',
        f'{t_l * 1e3:.0f} ms, {100 * share:.1f}% trainable', f'{t_f * 1e3:.0f} ms, 100% trainable',
        f'{t_f / t_l:.2f}× time, {1 / share:.0f}× fewer trained')

def bench_generate():
    net, proc = M.load_policy('sandbox/stage0')  # the shipped base: answers of realistic lengths
    ss, G = world.dataset('train', 8, families=('P/F', 'C/KI', 'C/R', 'C/MH')), 8 if Q else 16
    gen = lambda chunk: pipeline.generate(net, proc, ss, PROMPT, 112, n=G, greedy=False, max_new_tokens=160,
                                          keys=range(8), chunk=chunk)
    (t_all, t_one), (ours, base) = race([lambda: gen(None), lambda: gen(G)], 1 if Q else 2)
    same = [r.texts for r in ours] == [r.texts for r in base]
    add(f'5. rollouts of one sandbox step, 8 prompts × {G}, shipped base; same rollouts: '
        f'{"yes" if same else "**no**"}',
        f'{t_all:.1f} s (one generate call)', f'{t_one:.1f} s (a call per prompt)', f'{t_one / t_all:.1f}×')

def bench_rollout():
    """7. rollout throughput, a vLLM engine (--rollout vllm) vs generate on the same prompts and settings: the
    sandbox step, and one layer of Qwen2.5-VL-7B at its real widths and vocabulary (random weights: every row
    runs to the token budget). Needs the vLLM environment (requirements-vllm.txt)."""
    try:
        import rollout_vllm, vllm  # noqa: F401
    except ImportError:
        add('7. rollout throughput, vLLM vs generate', 'not measured: vllm is not installed here (run this figure in '
            'the vLLM environment, requirements-vllm.txt)')
        return
    from sandbox import tiny
    net, proc = M.load_policy('sandbox/stage0')
    lora.apply_lora(net, r=16, alpha=32)  # the sandbox's adapter, non-zero: the engine serves it as trained
    for _, m in lora.lora_modules(net):
        m.lora_B.data.normal_(0, 0.02)
    ss, G = world.dataset('train', 8, families=('P/F', 'C/KI', 'C/R', 'C/MH')), 8 if Q else 16
    rollout_ratio(net, proc, 'sandbox/stage0', ss, G, 160, f'sandbox step, 8 prompts × {G}, shipped base + adapter')
    del net
    d = tiny.build_config_dir(tempfile.mkdtemp(prefix='bench_'), 'qwen2.5-vl-7b', layers=1, vision_layers=1)
    cfg = json.load(open(os.path.join(d, 'config.json')))  # lm_head tied to the embeddings: the same (V, H)
    cfg['tie_word_embeddings'] = cfg['text_config']['tie_word_embeddings'] = True  # product per token, 2.2 GB
    json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'))  # less per copy (the engine holds ~8 GB on CPU)
    torch.manual_seed(0)
    net = M.load_model(d, random_init=True)  # fp32: this CPU has no fast bf16 matmul
    net.save_pretrained(d)  # the engine reads its weights from disk
    proc = M.load_processor(d)
    lora.apply_lora(net, r=64, alpha=64)  # method §7's adapter
    rollout_ratio(net, proc, d, ss[:1], 4, 16, '1-layer Qwen2.5-VL-7B (widths 3584 / 18944, vocab 151,936), '
                  '1 prompt × 4, 16 tokens, LoRA r 64')

def rollout_ratio(net, proc, base, ss, G, new, tag):
    import rollout_vllm
    engine = rollout_vllm.Engine(base, net, 0.02 if net.device.type == 'cpu' else 0.3,
                                 max_model_len=rollout_vllm.context_length(net, 112, new))
    engine.sync(net)
    gen = lambda f: f(net, proc, ss, PROMPT, 112, n=G, greedy=False, max_new_tokens=new, keys=range(len(ss)))
    (t_hf, t_vl), (hf, vl) = race([lambda: gen(pipeline.generate), lambda: gen(engine.generate)], 1 if Q else 2)
    tok = lambda rolls: sum(int(r.mask.sum()) for r in rolls)  # generated tokens up to and incl. the first EOS
    add(f'7. rollout throughput, {tag}', f'{tok(vl) / t_vl:.0f} tokens/s (vLLM engine, {tok(vl)} tokens)',
        f'{tok(hf) / t_hf:.0f} tokens/s (generate, {tok(hf)} tokens)', f'{tok(vl) * t_hf / (tok(hf) * t_vl):.2f}×')

def bench_logs():
    for st in (0, 1, 2):
        f = f'runs/stage{st}/log.jsonl'  # skip a line still being written; a re-run step counts once (its last)
        lines = open(f).readlines() if os.path.isfile(f) else []
        recs = list({(r := json.loads(x))['step']: r for x in lines if x.endswith('\n')}.values())
        tot = {k: sum(r.get(k, 0.0) for r in recs) / 60 for k in ('sec', 't_generate', 't_reward', 't_update')}
        parts = ', '.join(f'{k[2:]} {v:.1f}' for k, v in tot.items() if v and k != 'sec')
        add(f'6. `python train.py --stage 2`: stage {st} wall time, steps only (no held-out evals)',
            f'{sum(tot.values()):.1f} min{f" ({parts})" if parts else ""}, {len(recs)} distinct steps logged '
            f'(up to step {max(r["step"] for r in recs)})' if recs else 'not measured yet')
    for vote_n in (1, 8):  # eval writes its own wall time into summary.json
        runs = [json.load(open(f)) for f in sorted(glob.glob('runs/eval/*/summary.json'))]
        secs = [r['seconds'] for r in runs if r.get('vote') == vote_n and 'seconds' in r]
        queries = runs[-1]['n'] if runs else '?'
        add(f'6. `python eval.py{" --vote 8" if vote_n > 1 else ""}` wall time ({queries} queries)',
            f'{secs[-1] / 60:.1f} min (newest)' if secs else 'not measured yet')

def run(figures, description):
    """The command line of bench/speed.py and bench/scale.py: run the chosen figures, print and write the table."""
    global Q, REPS
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--only', default=','.join(figures), help=f'comma-separated subset of {",".join(figures)}')
    p.add_argument('--quick', action='store_true', help='fewer repeats and smaller sizes')
    p.add_argument('--out', default=f'runs/{os.path.basename(sys.argv[0])[:-3]}.md', help='the markdown table')
    args = p.parse_args()
    if not set(args.only.split(',')) <= set(figures):
        p.error(f'--only: choose from {",".join(figures)}')
    Q, REPS = args.quick, 3 if args.quick else 7
    for name in args.only.split(','):
        print(f'[bench] {name} ...', flush=True)
        figures[name]()
    cpu = next((x.split(':', 1)[1].strip() for x in open('/proc/cpuinfo') if x.startswith('model name')), '?')
    cuda = f'CUDA: {torch.cuda.get_device_name()}' if torch.cuda.is_available() else 'no CUDA'
    threads = os.environ.get('OMP_NUM_THREADS', '(unset)')
    cmd = f'OMP_NUM_THREADS={threads} nice -n {os.nice(0)} python {" ".join(sys.argv)}'
    out = '\n'.join([
        f'{datetime.datetime.now():%Y-%m-%d %H:%M}, {time.time() - T0:.0f} s: nproc {os.cpu_count()}, {cpu}, torch '
        f'{torch.__version__} ({torch.get_num_threads()} thread), load average '
        f'{open("/proc/loadavg").read().split()[0]}, '
        f'{cuda}. Command: `{cmd}`. Ours and the baseline run in one process on identical inputs, interleaved; on a '
        'shared machine absolute times are inflated on both sides alike: the ratios are the result. Times are '
        'medians over repeats, except single runs where a row says so.', '',
        '| figure | ours | baseline | ratio | target | met? |', '|---|---|---|---|---|---|',
        *('| ' + ' | '.join(r) + ' |' for r in rows)])
    print('\n' + out)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    open(args.out, 'w').write(out + '\n')


if __name__ == '__main__':
    run(dict(reward=bench_reward, vote=bench_vote, grpo=bench_grpo, lora=bench_lora, generate=bench_generate,
             rollout=bench_rollout, logs=bench_logs), __doc__.split('\n')[0])
