"""bench/smoke.py: the first thing to run on a GPU before a real run. Two stage-2 REST steps of a real
configuration with random weights (nothing to download): the real widths, vocabulary, processor
settings and image tokens (840² -> 900 for Qwen2.5-VL), N = 256 rollouts of 2,048 tokens, a random SAM
of the real size; it prints the peak GPU memory, the step time and how far lora_A moved (bf16 adapters
would not move at LR 5e-6). It runs train.py itself, unchanged, with one substitution: answers of
random weights never parse, so rollout i is scored on a synthetic answer with i mod 4 random objects,
which gives SAM and the update real work and every group a spread of rewards.

  python -m bench.smoke                                # one GPU: Qwen2.5-VL-7B configuration, N = 256
  python -m bench.smoke --arch qwen3-vl-8b --rollouts 64
  python -m bench.smoke --device cpu --layers 1 --rollouts 2 --group 2 --max-new-tokens 8   # same shapes, towers cut
Tested by: python -m pytest tests/test_smoke.py (bench/scale.py runs the CPU version of both configurations)
"""
import argparse, atexit, io, json, os, runpy, shutil, sys, tempfile
import numpy as np
import torch

import lora, rewards
from sandbox import tiny

p = argparse.ArgumentParser(description=__doc__.split('Tested by')[0],  # each default is said once, in its help
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--arch', default='qwen2.5-vl-7b', choices=sorted(tiny.ARCHS),
               help='configuration (default: qwen2.5-vl-7b)')
p.add_argument('--layers', type=int, default=None, help='language-model layers (default: all)')
p.add_argument('--vision-layers', type=int, default=None, help='vision blocks (default: --layers if given, else all)')
p.add_argument('--width', type=int, default=None, help='language-model hidden width, a multiple of 128 '
               '(default: the real one; the tests use 256 to stay fast)')
p.add_argument('--rollouts', type=int, default=256, help='REST N sampled per prompt (default: 256)')
p.add_argument('--group', type=int, default=16, help='G kept per prompt (default: 16)')
p.add_argument('--steps', type=int, default=2, help='stage-2 steps (default: 2)')
p.add_argument('--max-new-tokens', type=int, default=2048, help='response length; random weights use all '
               'of it (default: 2048)')
p.add_argument('--sam-type', default=None, choices=['vit_b', 'vit_l', 'vit_h', 'none'],
               help='a random SAM of this size; none: the colour segmenter (default: vit_h on a GPU, none on CPU)')
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
               help='torch device (default: cuda if there is one, else cpu)')
p.add_argument('--out', default=None, help='work dir, kept (default: a temp dir, deleted at the end)')
p.add_argument('extra', nargs='*', help='more train.py flags after --, e.g. -- --micro-batch 4 --gen-chunk 32')
args = p.parse_args()
out = args.out or tempfile.mkdtemp(prefix='smoke_')
if args.out is None:  # the random checkpoints (67 MB at one layer per tower, GBs at full size) go at exit
    atexit.register(shutil.rmtree, out, True)
cpu = not str(args.device).startswith('cuda')
sam_type = args.sam_type or ('none' if cpu else 'vit_h')


def write_data(path, rows=2, size=(1600, 1200)):
    """Stage-2 rows as ReasonSeg-X train is published: a large image, two target masks each."""
    import pyarrow as pa, pyarrow.parquet as pq
    from PIL import Image
    rng, (W, H) = np.random.default_rng(0), size
    images, masks = [], []
    for _ in range(rows):
        img, objs = rng.integers(0, 60, (H, W, 3), dtype=np.uint8), []
        for k in range(2):
            x, y = rng.integers(0, W - 400), rng.integers(0, H - 300)
            m = np.zeros((H, W), bool)
            m[y:y + 300, x:x + 400] = True
            img[m] = (200, 40 + 100 * k, 40)
            objs.append(m.tolist())
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format='JPEG')
        images.append({'bytes': buf.getvalue(), 'path': None})
        masks.append(objs)
    pq.write_table(pa.table({'problem': ['something to sit on'] * rows, 'image': images, 'solution_mask': masks}), path)


def synthetic(rng, side, count):
    """An answer with `count` random objects in model-input pixels (a random model writes garbage)."""
    objs = []
    for _ in range(count):
        x1, y1 = rng.integers(0, side - 100, 2)
        objs.append({'label': 'chair', 'bbox_2d': [int(x1), int(y1), int(x1) + 100, int(y1) + 80],
                     'point_2d': [int(x1) + 50, int(y1) + 40]})
    return f'<think>a chair</think><answer>{json.dumps(objs)}</answer>'


narrow = {}
if args.width:  # head_dim stays 128 (M-RoPE sections as released); the merger projects to the new width
    heads = args.width // 128
    narrow = dict(text=dict(hidden_size=args.width, intermediate_size=4 * args.width, num_attention_heads=heads,
                            num_key_value_heads=min(heads, 4), head_dim=128), vision=dict(out_hidden_size=args.width))
model_dir = tiny.build_config_dir(os.path.join(out, 'model'), args.arch, layers=args.layers,
                                  vision_layers=args.vision_layers or args.layers, **narrow)
write_data(os.path.join(out, 'data.parquet'))
argv = ['train.py', '--stage', '2', '--model', model_dir, '--random-init', '--init-adapter', 'none',
        '--data', os.path.join(out, 'data.parquet'), '--batch', '1', '--steps', str(args.steps), '--rollouts',
        str(args.rollouts), '--group', str(args.group), '--max-new-tokens', str(args.max_new_tokens),
        '--eval-every', '0', '--out', os.path.join(out, 'run'), '--device', args.device, *args.extra]
if sam_type != 'none':  # a random SAM of the real size, saved as a checkpoint file
    from segment_anything import sam_model_registry
    torch.save(sam_model_registry[sam_type]().state_dict(), os.path.join(out, 'sam.pth'))
    argv += ['--sam', os.path.join(out, 'sam.pth'), '--sam-type', sam_type]

# The one substitution: score synthetic answers; and remember lora_A as initialised.
rng, score_group, apply_lora, initial = np.random.default_rng(0), rewards.score_group, lora.apply_lora, {}
rewards.score_group = lambda texts, sample, seg, stage, input_wh, *a, **k: score_group(
    [synthetic(rng, input_wh[0], i % 4) for i in range(len(texts))], sample, seg, stage, input_wh, *a, **k)


def remember(model, **kw):
    result = apply_lora(model, **kw)
    initial.update({n: m.lora_A.detach().clone() for n, m in lora.lora_modules(model)})
    return result


lora.apply_lora = remember
print(f'[smoke] {args.arch}: python {" ".join(argv)}', flush=True)
sys.argv = argv
run = runpy.run_path('train.py', run_name='__main__')
log = [json.loads(line) for line in open(os.path.join(out, 'run', 'log.jsonl'))]
moved = torch.cat([(m.lora_A.detach() - initial[n]).flatten().float() for n, m in lora.lora_modules(run['net'])])
lr = run['args'].lr
for r in log:
    mem = f"peak GPU memory {r['peak_mem_gb']:.1f} GiB, " if 'peak_mem_gb' in r else ''
    print(f"[smoke] step {r['step']}: {mem}step {r['t_generate'] + r['t_reward'] + r['t_update']:.1f} s (generate "
          f"{r['t_generate']:.1f}, reward {r['t_reward']:.1f}, update {r['t_update']:.1f}), "
          f"mean response {r['resp_len']:.0f} tokens")
prompt = run['rolls'][0].prompt_ids
n_image_tokens = int((prompt == run['net'].config.image_token_id).sum())
print(f"[smoke] input {run['args'].image_size}² -> {n_image_tokens} image tokens "
      f"of a {len(prompt)}-token prompt; vocabulary {run['net'].config.get_text_config().vocab_size:,}")
print(f'[smoke] lora_A: {100 * (moved != 0).float().mean():.1f}% of {moved.numel():,} entries moved, '
      f'median |change| {moved.abs().median():.2e} (lr {lr:g}); adapters {next(iter(initial.values())).dtype}')
