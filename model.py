"""model.py: the policy side of StAR: load a Qwen-VL checkpoint (or build a tiny one), write the
prompt (method §1-2). Reading its answer (parse, map coordinates back) is answer.py, re-exported here.

The segmenter side (SAM, the embedding cache) is in segment.py.
Tested by: python -m pytest tests/test_model.py
"""
import math, os
import torch

from answer import MAX_OBJECTS, parse_answer, place_answers, to_model, to_original  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------- prompts (method §2)
# Our own wording. {question} is the normalised query. A released checkpoint should be evaluated
# with the prompt it was trained on: pass --prompt-file, or ship prompt.txt in the checkpoint dir.
PROMPT = ('Please find "{question}" in the image. Think step by step inside <think> </think> tags: '
          '{reason}Then give every matching object inside <answer> </answer> tags as a JSON list, one '
          'entry per object with {fields} inside the object. Return ALL matching objects.{empty} Example: '
          '<answer>[{example}]</answer>')
FIELDS = 'a short "label", a bounding box "bbox_2d" [x1,y1,x2,y2] and a point "point_2d" [x,y]'
EXAMPLE = ('{"label": "cup", "bbox_2d": [10,20,60,90], "point_2d": [35,55]}, '
           '{"label": "cup", "bbox_2d": [70,20,120,90], "point_2d": [95,55]}')
REASON = 'first work out what the query refers to, then find it in the image. '
EMPTY = ' If nothing matches, answer <answer>[]</answer>.'
NO_LABEL = '-nolabel'  # suffix of the label-free variants (train.py --no-label; method §2, "Ablation flags")


def _templates(fields, example):
    return {  # stage 1 grounds; stage 2 and evaluation add the reasoning hint; eval the empty case
        'stage1': PROMPT.format(question='{question}', reason='', empty='', fields=fields, example=example),
        'stage2': PROMPT.format(question='{question}', reason=REASON, empty='', fields=fields, example=example),
        'eval': PROMPT.format(question='{question}', reason=REASON, empty=EMPTY, fields=fields, example=example)}


# The label-free variants (the predecessors' answer: box and point only) drop the label from the
# request and from the example; nothing else in the wording changes.
TEMPLATES = {**_templates(FIELDS, EXAMPLE),
             **{k + NO_LABEL: v for k, v in _templates(FIELDS.replace('a short "label", ', ''),
                                                       EXAMPLE.replace('"label": "cup", ', '')).items()}}


def template_name(name, label=True):
    """'stage1' | 'stage2' | 'eval' -> the named template's key, label-free with label=False."""
    return name if label else name + NO_LABEL


def normalize_query(q):
    """Lower-case and drop trailing . ? ! and quotes (method §2)."""
    return q.strip().lower().rstrip('.?!" ').strip()


def build_prompt(question, template):
    if '{question}' not in template:
        raise ValueError('prompt template has no {question} placeholder')
    return template.replace('{question}', normalize_query(question))


def load_template(path_or_name, ckpt_dir=None):
    """A template name ('stage1'|'stage2'|'eval'), a text file, or the checkpoint's own prompt.txt."""
    if path_or_name in TEMPLATES:
        own = os.path.join(ckpt_dir or '', 'prompt.txt')
        return open(own).read() if ckpt_dir and os.path.isfile(own) else TEMPLATES[path_or_name]
    if not os.path.isfile(path_or_name):
        raise FileNotFoundError(f'--prompt-file {path_or_name}: no such file')
    text = open(path_or_name).read()
    build_prompt('x', text)  # fails early, naming the problem, if {question} is missing
    return text


# ----------------------------------------------------------------------------- loading (method §1)
def _check_dir(path, weights=True):
    if not os.path.isdir(path):
        raise FileNotFoundError(f'model checkpoint {path!r} is not a directory')
    files = os.listdir(path)
    if 'config.json' not in files:
        raise FileNotFoundError(f'model checkpoint {path!r} has no config.json')
    if weights and not any(f.endswith(('.safetensors', '.bin')) for f in files):
        raise FileNotFoundError(f'model checkpoint {path!r} has no weights (*.safetensors / *.bin)')
    if not any(f.startswith(('tokenizer', 'vocab')) for f in files):
        raise FileNotFoundError(f'model checkpoint {path!r} has no tokenizer files')


def load_processor(path):
    """The checkpoint's processor (tokenizer + image processor), left-padding for generation."""
    from transformers import AutoProcessor
    _check_dir(path, weights=False)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = 'left'  # generation appends on the right
    return processor


def load_model(path, dtype=None, device='cpu', random_init=False):
    """The checkpoint's model; bf16 on GPU, fp32 on CPU unless dtype is given. random_init: the
    architecture of config.json with random weights, built on the device (a smoke test of a real
    configuration without its weights)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    _check_dir(path, weights=not random_init)
    dtype = dtype or (torch.bfloat16 if str(device).startswith('cuda') else torch.float32)
    if not random_init:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    from transformers import GenerationConfig
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    if os.path.isfile(os.path.join(path, 'generation_config.json')):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def load_policy(path, dtype=None, device='cpu', adapter=None):
    """Any local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint dir -> (model, processor).
    adapter: a LoRA file written by train.py (lora.save_lora), wrapped and loaded on top."""
    _check_dir(path)
    processor = load_processor(path)
    model = load_model(path, dtype, device)
    if adapter is not None:
        import lora
        state, meta = lora.read_lora(adapter)
        lora.apply_lora(model, r=meta['r'], alpha=meta['alpha'])
        lora.load_lora(model, state)
    return model, processor


def default_coord_mode(model):
    return 'auto' if 'qwen3' in model.config.model_type else 'pixel'


def _token_side(processor):
    ip = processor.image_processor
    return getattr(ip, 'patch_size', 14) * getattr(ip, 'merge_size', 2)  # one visual token's side in pixels


def default_image_size(processor, paper=840):
    """The model-input side: method §3's 840, or less when the processor keeps fewer pixels (the
    sandbox base keeps 112²; a larger input would be shrunk and its coordinates misread)."""
    ip = processor.image_processor
    most = (getattr(ip, 'size', None) or {}).get('longest_edge') or getattr(ip, 'max_pixels', None)
    unit = _token_side(processor)
    return min(paper, math.isqrt(int(most)) if most else paper) // unit * unit  # whole visual tokens


def check_image_size(processor, size):
    """The processor resizes an input to whole visual tokens within its pixel budget; any other side
    would be changed behind our back and the answer's pixel coordinates misread."""
    unit, most = _token_side(processor), default_image_size(processor, paper=1 << 20)
    if size % unit or not unit <= size <= most:
        raise ValueError(f'--image-size {size}: must be a multiple of {unit} (one visual token) between {unit} '
                         f'and {most} for this processor')


def make_inputs(processor, images, prompts, answers=None):
    """Chat-format a batch: images (PIL, already at model-input size), prompt strings, and
    optionally teacher answers appended after the generation prompt. -> BatchFeature (B, T)."""
    texts = []
    for i, p in enumerate(prompts):
        msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': p}]}]
        t = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        texts.append(t if answers is None else t + answers[i] + '<|im_end|>')
    return processor(text=texts, images=list(images), padding=True, return_tensors='pt')


