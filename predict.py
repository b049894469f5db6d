"""predict.py: one image and one query through StAR: the think, the JSON answer, an overlay and the
mask (method §1-4; --vote N: mask voting over N samples, method §10).

  python predict.py --image photo.jpg --query "something that could be a wheel"   # sandbox model
  python predict.py --image photo.jpg --query "where can I sit" --model Qwen2.5-VL-7B \\
      --adapter runs/stage2/last/adapter.safetensors --sam sam_vit_h.pth --sam-type vit_h --vote 8
Writes <out>/<image name>.png (image | prediction: masks, boxes, points, labels; the query as title)
and <out>/<image name>_mask.png (refused when there, unless --force). Exit status 0: an answer (objects,
or "no object"); 3: no sample gave a readable answer (the files are written; the empty mask is no answer).
Loading and voting: inference.py.
Tested by: python -m pytest tests/test_predict.py
"""
import argparse, json, os, sys
import numpy as np
import torch
from PIL import Image

import data, pipeline, vis
from inference import (GEN_CHUNK, SANDBOX_NEW_TOKENS, SANDBOX_THREADS, check_ints, check_out, combine, fail,
                       limits_help, load, resolve, vllm_engine)
from sandbox import world


def main():
    p = argparse.ArgumentParser(description=__doc__.split('Writes')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('common')
    g.add_argument('--image', required=True, metavar='PATH', help='an image file (any size; EXIF orientation applied)')
    g.add_argument('--query', required=True, metavar='TEXT', help='what to find, e.g. "something to sit on"')
    g.add_argument('--vote', type=int, default=1, metavar='N', help='samples: 1 = greedy, N > 1 = mask voting '
                   '(T = 1, top-p 0.9) (default: 1)')
    g.add_argument('--gen-chunk', type=int, metavar='R', help='samples per generate call: bounds the KV cache; the '
                   f'answers do not depend on it (default: {GEN_CHUNK} with --model, all in the sandbox)')
    g.add_argument('--adapter', metavar='FILE', help='LoRA file (default without --model: newest runs/stage{2,1})')
    g.add_argument('--out', default='runs/predict', metavar='DIR', help='output folder (default: runs/predict)')
    g.add_argument('--force', action='store_true', help='overwrite <out>/<image name>.png and _mask.png if there')
    g.add_argument('--seed', type=int, default=0, metavar='S', help='sampling seed under --vote (default: 0)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', metavar='DEV',
                   help='torch device (default: cuda if there is one, else cpu)')
    g.add_argument('--rollout', default='hf', choices=['hf', 'vllm'], help='who samples: transformers\' generate '
                   '(hf, default) or a vLLM engine in this process (vllm: README "Rollouts through vLLM")')
    r = p.add_argument_group('paper scale: a real checkpoint and SAM')
    r.add_argument('--model', metavar='DIR', help='local Qwen2/2.5/3-VL checkpoint dir (default: sandbox/stage0)')
    r.add_argument('--sam', metavar='PATH', help='transformers SAM 2 / 2.1 checkpoint DIR or segment-anything FILE '
                   '(default: the colour segmenter)')
    r.add_argument('--sam-type', default='vit_h', choices=['vit_b', 'vit_l', 'vit_h'], help='SAM size (default: vit_h)')
    r.add_argument('--image-size', type=int, metavar='PX', help='model input side (default: adapter meta, else 840 '
                   'or what the processor keeps)')
    r.add_argument('--coord-mode', choices=['pixel', 'grid1000', 'unit', 'auto'], help='answer coordinates '
                   '(default: adapter meta, else by model type)')
    r.add_argument('--prompt-file', metavar='FILE', help='prompt template with {question} (default: the base\'s, '
                   'else ours)')
    r.add_argument('--max-new-tokens', type=int, metavar='T', help=f'longest response (default: 2048; sandbox '
                   f'{SANDBOX_NEW_TOKENS})')
    s = p.add_argument_group('sandbox (no --model): sandbox/stage0 + the newest runs/stage{2,1} adapter, colour '
                             'segmenter (flat-coloured images)')
    s.add_argument('--threads', type=int, metavar='K', help=f'CPU threads (default: {SANDBOX_THREADS} in the sandbox)')
    p.add_argument_group('limits', limits_help('--vote', '--max-new-tokens', '--image-size', '--threads', '--seed',
                                               '--gen-chunk'))
    p.error = lambda msg: p.exit(2, f'[predict] error: {msg} (python predict.py --help)\n')  # one line, no usage
    args = p.parse_args()
    check_ints('predict', [('--vote', args.vote, 1), ('--max-new-tokens', args.max_new_tokens, 1),
                           ('--image-size', args.image_size, 1), ('--threads', args.threads, 1),
                           ('--seed', args.seed, 0), ('--gen-chunk', args.gen_chunk, 1)])
    if not args.query.strip():
        fail('predict', f'--query {args.query!r}: empty; ask for something, e.g. --query "something to sit on"')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail('predict', f'--out {args.out}: is a file, not a folder')
    check_out('predict', args.out)  # not a training folder, writable: before the work, not after it
    if args.sam is not None and not os.path.exists(args.sam):
        fail('predict', f'--sam {args.sam}: no such file or folder')
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        fail('predict', f'--prompt-file {args.prompt_file}: no such file')
    try:  # read the image before loading any model
        image = data.to_rgb(Image.open(args.image))  # 16-bit grey scaled to 8 bits
    except Exception as e:  # noqa: BLE001
        fail('predict', f'--image {args.image}: unreadable ({type(e).__name__}: {e})')
    stem = os.path.join(args.out, os.path.splitext(os.path.basename(args.image))[0])
    there = [f for f in (f'{stem}.png', f'{stem}_mask.png') if os.path.exists(f)]
    if there and not args.force:
        fail('predict', f'--out {args.out}: {there[0]} is there from an earlier run: --force overwrites it, '
             'or pass another --out')
    different = world.unlike(image) if args.model is None else ''
    if different:  # the sandbox model has only seen flat shapes on dark grey: its answer here means little
        print(f'[predict] WARNING: {args.image} is unlike the sandbox world the default model knows: {different}. '
              'Expect unparsable or wrong answers; a real checkpoint: --model DIR (README "Your own image")',
              file=sys.stderr)
    base, adapter, meta = resolve(args.model, args.adapter, 'predict')
    pol = load('predict', base, adapter, meta, args.device, args.image_size, args.coord_mode, args.prompt_file,
               args.sam, args.sam_type, args.threads, sandbox=args.model is None)
    H, W = image.shape[:2]
    sample = data.Sample(id=args.image, image=image, query=args.query, masks=np.zeros((0, H, W), bool))
    max_new = args.max_new_tokens or (SANDBOX_NEW_TOKENS if args.model is None else 2048)
    generate = pipeline.generate
    if args.rollout == 'vllm':  # the adapter, if any, is handed to the engine
        generate = vllm_engine('predict', pol, base, adapter, None, 1, max_new, args.seed).generate
    texts = generate(pol['net'], pol['proc'], [sample], pol['template'], pol['image_size'], n=args.vote,
                     greedy=args.vote == 1, top_p=0.9, seed=args.seed, max_new_tokens=max_new,
                     chunk=args.gen_chunk or (None if args.model is None else GEN_CHUNK))[0].texts
    answers = pipeline.segment_answers(pol['seg'], sample, texts, pol['image_size'], pol['coord_mode'])
    pred, layers, _, reason = combine(answers, args.vote, shape=(H, W))
    print(f'[predict] {base} + {adapter or "no adapter"} | {W}x{H} image, model input {pol["image_size"]}')
    for i, (text, (objs, _, _)) in enumerate(zip(texts, answers)):
        head = f'sample {i + 1}/{len(texts)} ' if len(texts) > 1 else ''
        print(f'{head}think: {vis.shorten(text, 400)}')
        print(f'{head}answer (original pixels): ' + ('unparsable (no object list could be read)' if objs is None
                                                     else json.dumps(objs) + (' (no object)' if not objs else '')))
    if reason:
        print(f'vote: {reason}')
    unparsable = all(objs is None for objs, _, _ in answers[:args.vote])  # no answer at all, not "no object"
    os.makedirs(args.out, exist_ok=True)
    note = '; '.join(x for x in (reason, different and f'WARNING: image unlike the sandbox world: {different}') if x)
    vis.overlay(f'{stem}.png', image, layers, args.query, texts[0], note=note, unparsable=unparsable)
    vis.save_mask(pred, f'{stem}_mask.png')
    result = f'{int(pred.sum())} px predicted' if pred.any() else 'no answer' if unparsable else 'no object'
    print(f'[predict] {result} | wrote {stem}.png (overlay), {stem}_mask.png')
    if unparsable:
        print('[predict] WARNING: ' + ('the answer is' if len(answers) == 1 else f'all {len(answers)} answers are') +
              ' unparsable: the empty mask means "no answer", not "no object" (exit status 3)', file=sys.stderr)
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
