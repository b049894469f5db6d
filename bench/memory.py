"""bench/memory.py: what --shard (FSDP2, parallel.shard) buys in memory per rank. (1) measured: one GRPO step
of the tiny sandbox model on 2 CPU processes (gloo), each rank's peak with and without sharding; loading for
--shard both ways (each rank reads its slices, parallel.load_sharded; or each loads the whole, then shards):
each rank's peak host memory and peak of tensors allocated, on a wide tiny model; (2) estimated
from the real configurations (parameter counts exact, from the model built on the meta device; activations
from the formulas below): per-GPU memory at Qwen2.5-VL-7B and Qwen3-VL-32B, one GPU's full copy vs sharded
over the 8 GPUs of a node. A measurement, not a test (bench/speed.py holds the other figures):
  OMP_NUM_THREADS=1 python -m bench.memory [--only measured,loading,estimate]
"""
import argparse, json, os, subprocess, sys, tempfile
import torch

from bench.speed import peak_mb  # peak MB of tensors allocated while a function runs (profiler events)

GB, MB = 2 ** 30, 2 ** 20
# Qwen3-VL-32B: the public config.json of a Qwen3-VL-32B checkpoint (huggingface.co/quanliang/F1; text tower
# = Qwen3-32B: 64 layers, width 5120, MLP 25600, 64 heads, 8 KV heads of 128; vision as Qwen3-VL-8B's, out 5120)
QWEN3_32B = dict(text=dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                           num_key_value_heads=8, head_dim=128), vision=dict(out_hidden_size=5120))
SHARDS, ROWS, TOKENS, PROMPT, MICRO, R, CHUNK = 8, 64, 3000, 1000, 8, 64, 512


def held_mb(net, opt):
    """MB this rank holds between steps: its parameters (its shards under --shard), buffers, optimizer state."""
    local = lambda t: t.to_local() if hasattr(t, 'to_local') else t  # noqa: E731
    ts = [*net.parameters(), *net.buffers(), *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    return sum(local(t).numel() * local(t).element_size() for t in ts) / MB


def worker(mode, base, out):
    """One rank: the base + LoRA r 16, one untimed step (optimizer state made), then a measured step:
    1 prompt x 8 rollouts of 48 tokens, GRPO update in micro-batches of 4. Writes its numbers to out."""
    import grpo, lora, parallel, pipeline
    from sandbox import world
    import model as M
    torch.set_num_threads(1)
    _, rank, world_size, dev = parallel.init_distributed('cpu')
    torch.manual_seed(0)
    net, proc = M.load_model(base), M.load_processor(base)
    lora.apply_lora(net, r=16, alpha=32)
    if mode == 'shard':
        parallel.shard(net, dev)
    params = lora.lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(k):
        rolls = pipeline.generate(net, proc, [world.sample('train', k * world_size + rank)], 'find: {question}', 112,
                                  n=8, greedy=False, max_new_tokens=48, seed=0, keys=[k * world_size + rank])
        adv = grpo.group_advantages(rolls[0].mask.sum(1).float()[None])[0]
        opt.zero_grad(set_to_none=True)
        for s in range(0, 8, 4):  # every rank makes 2 passes: no equalising needed here
            b = pipeline.update_batch(rolls[0], list(range(s, s + 4)))
            logp = grpo.token_logprobs(net, b)
            grpo.grpo_loss(logp, logp.detach(), adv[s:s + 4], b['response_mask'])[0].backward()
        parallel.all_reduce_grads(params, dev)
        opt.step()
    step(0)
    held = held_mb(net, opt)
    with open(os.path.join(out, f'{mode}{rank}.json'), 'w') as f:
        json.dump(dict(held=held, peak=held + peak_mb(lambda: step(1), 'cpu')), f)


def _rss_mb():
    """This process's resident memory now, MB: private (anonymous: tensors it made) and file-backed (pages of
    memory-mapped checkpoint files it touched; the node's page cache holds each file once, whoever maps it)."""
    with open('/proc/self/status') as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(':', 1) for line in f) if k in ('RssAnon', 'RssFile')}
    return kb['RssAnon'] / 1024, kb['RssFile'] / 1024


def load_worker(mode, base, out):
    """One rank loads `base` for --shard, LoRA r 16 applied: 'whole' as before (every rank reads the whole model,
    puts it on its device, then shards it) or 'sharded' (parallel.load_sharded: a meta-device build, each rank
    reads its slices only). Writes the peak rise of its private and file-backed memory while loading (sampled
    every 2 ms) and the parameter bytes it holds after."""
    import threading, time
    import lora, parallel
    import model as M
    torch.set_num_threads(1)
    _, rank, _, dev = parallel.init_distributed('cpu')
    adapters = lambda n: lora.apply_lora(n, r=16, alpha=32)  # noqa: E731
    from transformers import AutoConfig, AutoModelForImageTextToText
    with torch.device('meta'):  # the libraries both ways import, loaded before the measurement starts
        AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base))
    (anon0, file0), peak, done, box = _rss_mb(), [0.0, 0.0], threading.Event(), []

    def watch():
        while not done.is_set():
            anon, file = _rss_mb()
            peak[:] = max(peak[0], anon - anon0), max(peak[1], file - file0)
            time.sleep(0.002)
    t = threading.Thread(target=watch)
    t.start()
    if mode == 'whole':
        net = M.load_model(base, device=dev)
        adapters(net)
        box.append(parallel.shard(net, dev))
    else:
        box.append(parallel.load_sharded(base, None, dev, adapters, lora.initial))
    done.set()
    t.join()
    local = lambda t: t.to_local() if hasattr(t, 'to_local') else t  # noqa: E731
    held = sum(local(p).numel() * local(p).element_size() for p in box[0].parameters()) / MB
    with open(os.path.join(out, f'load-{mode}{rank}.json'), 'w') as f:
        json.dump(dict(anon=peak[0], file=peak[1], held=held), f)


def loading():
    """Loading for --shard, both ways, 2 CPU ranks (gloo), on a wide tiny model (8 layers of width 1,024)."""
    import transformers
    from sandbox import tiny, world
    transformers.utils.logging.disable_progress_bar()
    tmp = tempfile.mkdtemp(prefix='bench_load_')
    wide = tiny.build_tiny_policy(os.path.join(tmp, 'wide'), words=world.vocabulary(), hidden=1024, layers=8, heads=8,
                                  mrope=(16, 24, 24), prompt='find: {question}')
    from safetensors.torch import load_file, save_file
    for f in (os.path.join(wide, f) for f in os.listdir(wide) if f.endswith('.safetensors')):
        # bf16 on disk, fp32 in memory: each way copies what it reads, as a GPU copies it from the file (on CPU
        # an fp32 file would stay memory-mapped and the copy, the device's share, would go unseen)
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={'format': 'pt'})
    size = sum(os.path.getsize(os.path.join(wide, f)) for f in os.listdir(wide) if f.endswith('.safetensors')) / MB
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    for mode in ('whole', 'sharded'):
        subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'bench.memory',
                        '--load-worker', mode, wide, tmp], check=True, env=env, capture_output=True)
    r = {m: [json.load(open(os.path.join(tmp, f'load-{m}{k}.json'))) for k in (0, 1)] for m in ('whole', 'sharded')}
    cell = lambda m, key: ' / '.join(f'{x[key]:.0f}' for x in r[m])  # noqa: E731
    lines = [f'| loading for --shard, 2 CPU ranks (gloo), tiny 8 x 1,024 ({size:.0f} MB of bf16 weights, read as '
             'fp32), MB per rank (rank 0 / rank 1) | each rank reads its slices (`parallel.load_sharded`) | '
             'each rank loads the whole, then shards |', '|---|---|---|']
    for key, name in (('anon', 'peak private memory while loading (tensors: on a GPU, device memory)'),
                      ('file', 'peak file-backed memory while loading (checkpoint pages: one page cache per node)'),
                      ('held', 'parameters held after loading (shards, lm_head and embeddings whole, LoRA)')):
        lines.append(f'| {name} | {cell("sharded", key)} | {cell("whole", key)} |')
    return lines


def measured():
    """The sandbox base (6 MB of weights: FSDP's buffers, about 3 layers' worth of all-gathered weights, outweigh
    what sharding saves) and a wider tiny model (8 layers of width 512, 134 MB), each rank's max of the two."""
    import transformers
    from sandbox import tiny, world
    transformers.utils.logging.disable_progress_bar()
    tmp = tempfile.mkdtemp(prefix='bench_memory_')
    wide = tiny.build_tiny_policy(os.path.join(tmp, 'wide'), words=world.vocabulary(), hidden=512, layers=8, heads=8,
                                  mrope=(8, 12, 12), prompt='find: {question}')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    lines = ['| figure, 2 CPU ranks (gloo), the larger rank | --shard | every rank whole | ratio |',
             '|---|---|---|---|']
    for name, base in (('sandbox base', 'sandbox/stage0'), ('tiny, 8 layers x 512', wide)):
        out = tempfile.mkdtemp(dir=tmp)
        for mode in ('plain', 'shard'):
            subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m',
                            'bench.memory', '--worker', mode, base, out], check=True, env=env, capture_output=True)
        r = {m: [json.load(open(os.path.join(out, f'{m}{k}.json'))) for k in (0, 1)] for m in ('plain', 'shard')}
        mx = lambda m, key: max(x[key] for x in r[m])  # noqa: E731
        row = lambda k: f"{mx('shard', k):.1f} MB | {mx('plain', k):.1f} MB | {mx('shard', k) / mx('plain', k):.2f}x |"
        lines += [f"| {name}: held between steps (weights, LoRA, AdamW) | {row('held')}",
                  f"| {name}: peak of one GRPO step (1 prompt x 8 rollouts of 48 tokens, update) | {row('peak')}"]
    return lines


def counts(arch, **over):
    """Exact parameter counts of a configuration (built on the meta device, LoRA r 64 applied)."""
    import lora
    from sandbox import tiny
    from transformers import AutoConfig, AutoModelForImageTextToText
    d = tiny.build_config_dir(tempfile.mkdtemp(), arch, **over)
    with torch.device('meta'):
        net = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(d), dtype=torch.bfloat16)
    lora.apply_lora(net, r=R, alpha=R)
    c = net.config.text_config
    H, layer = c.hidden_size, net.model.language_model.layers[0]
    return dict(total=sum(p.numel() for n, p in net.named_parameters() if 'lora_' not in n), L=c.num_hidden_layers,
                head=net.lm_head.weight.numel(), embed=net.get_input_embeddings().weight.numel(), H=c.hidden_size,
                lora=sum(p.numel() for p in lora.lora_parameters(net)), I=c.intermediate_size, V=c.vocab_size,
                layer=sum(p.numel() for n, p in layer.named_parameters() if 'lora_' not in n),
                kv=2 * c.num_hidden_layers * c.num_key_value_heads * getattr(c, 'head_dim', H // c.num_attention_heads))


def estimate():
    """Per-GPU GB. Static: bf16 base; LoRA fp32 with its gradient and AdamW's two moments (16 B per parameter);
    SAM vit_h fp32. The step's peak is the larger of generation (KV cache of one 64-row chunk of 3,000 tokens, bf16,
    plus the prefill of its 1,000-token prompts: 3 MLP intermediates of 64 x 1,000 x I) and the update (gradient
    checkpointing: each layer's input for 8 x 3,000 tokens, one layer's recomputation and backward ~2 x (3I + 6H)
    per token, the fp32 lm_head chunks of 512 tokens ~3 x 512 x V x 4 B). SAM's encode runs between the two and is
    smaller. Sharded: everything but lm_head is cut in 8; two decoder layers and the embedding are whole while in
    use. Not counted: the CUDA context and allocator slack (~1-3 GB)."""
    from segment_anything import sam_model_registry
    with torch.device('meta'):
        sam = sum(p.numel() for p in sam_model_registry['vit_h']().parameters()) * 4 / GB
    runs = [('7B', 1, ROWS), ('7B', SHARDS, ROWS), ('32B', 1, ROWS), ('32B', SHARDS, ROWS), ('32B', SHARDS, ROWS // 2)]
    lines = ['| per GPU (GB) | ' + ' | '.join(f'{m}, ' + ('1 GPU' if s == 1 else f'--shard {s}') + (
        f', --gen-chunk {rows}' if rows != ROWS else '') for m, s, rows in runs) + ' |', '|---' * (len(runs) + 1) + '|']
    cs = {'7B': counts('qwen2.5-vl-7b'), '32B': counts('qwen3-vl-8b', **QWEN3_32B)}
    cols = []
    for m, shards, rows in runs:
        c = cs[m]
        base, head, lora_ = c['total'] * 2 / GB, c['head'] * 2 / GB, c['lora'] * 16 / GB
        gen = (c['kv'] * 2 * rows * TOKENS + 3 * rows * PROMPT * c['I'] * 2) / GB
        act = (c['L'] * MICRO * TOKENS * c['H'] * 2 + 2 * MICRO * TOKENS * (3 * c['I'] + 6 * c['H']) * 2
               + 3 * CHUNK * c['V'] * 4) / GB
        w = base if shards == 1 else (base - head) / shards + head + (2 * c['layer'] + c['embed']) * 2 / GB
        held = base if shards == 1 else (base - head) / shards + head  # after loading, before any layer runs
        cols.append([w, lora_ / shards, sam, gen, act, w + lora_ / shards + sam + max(gen, act),
                     base + lora_ / shards + sam + gen,
                     SHARDS * base if shards > 1 else base, base + (SHARDS * head if shards > 1 else 0), base, held])
    names = ['base weights, bf16 (sharded: + lm_head whole, 2 layers and the embedding while in use)',
             f'LoRA r {R} + gradient + AdamW, fp32', 'SAM vit_h, fp32',
             f'generate: KV cache of one chunk x {TOKENS} tokens + its prefill', f'update: activations, checkpointed, '
             f'{MICRO} x {TOKENS} tokens', '**peak ≈ static + max(generate, update)**',
             'generating with the whole model gathered once per call (`parallel.gathered`, under --shard when it '
             'fits in half the free memory: 7B yes, 32B no)',
             f'loading, host RAM per node of {SHARDS} GPUs: each rank loads the whole model, then shards',
             'loading, host RAM per node: `parallel.load_sharded` (the files once, in the page cache, + each rank '
             'reading lm_head whole)', 'loading, device peak per GPU: the whole model, then sharded',
             'loading, device peak per GPU: `parallel.load_sharded` (its shards + lm_head)']
    return lines + [f'| {n} | ' + ' | '.join(f'{c[i]:.1f}' for c in cols) + ' |' for i, n in enumerate(names)]


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split(' A measurement, not a test')[0])
    p.add_argument('--only', default='measured,loading,estimate', help='comma-separated subset of measured,loading,'
                   'estimate')
    p.add_argument('--out', default='runs/bench_memory.md', help='where the markdown tables are written')
    p.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)  # internal: MODE BASE DIR, one rank under torchrun
    p.add_argument('--load-worker', nargs=3, help=argparse.SUPPRESS)  # internal, the same for loading()
    args = p.parse_args()
    if args.worker or args.load_worker:
        (worker if args.worker else load_worker)(*(args.worker or args.load_worker))
        sys.exit(0)
    text = []
    for name, fn in (('measured', measured), ('loading', loading), ('estimate', estimate)):
        if name in args.only.split(','):
            text += fn() + ['']
    print('\n'.join(text))
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(text))
