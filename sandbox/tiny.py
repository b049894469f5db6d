"""sandbox/tiny.py: checkpoint directories built offline, loaded through model.py exactly like real ones.
- build_tiny_policy: the sandbox's tiny random Qwen2.5-VL (config, weights, tokenizer with Qwen's
  special tokens and chat template, image + video processor).
- build_config_dir: a real configuration (Qwen2.5-VL-7B, Qwen3-VL-8B: the public config.json,
  generation_config.json and processor settings; special tokens at their real ids) without weights,
  optionally with fewer layers or narrower widths; `--random-init` / model.load_model(random_init=True)
  build it with random weights. For smoke runs and tests of the real shapes. Nothing is downloaded.

Why the odd settings: with head_dim 32 the default rope_theta 1e6 makes image rows/columns nearly
indistinguishable to the LM; theta 10 and more rotary dims for height/width (mrope [2,7,7]) let a
tiny model read positions (docs/experiments.md, "Stage 0"). Numbers are whole tokens.
Tested by: python -m pytest tests/test_model.py
"""
import os, re
import torch

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|vision_start|>', '<|vision_end|>',
           '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<|unk|>']
# One piece per tag, number, word, whitespace run or symbol; decoding just concatenates pieces.
PIECES = r'</?think>|</?answer>|bbox_2d|point_2d|\d+|[A-Za-z]+|\s+|[^\sA-Za-z\d]'
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(corpus, max_number, special_ids=None):
    """A word-level tokenizer knowing the corpus's pieces and the numbers 0..max_number; special_ids:
    {token: id} to place Qwen's special tokens at a real checkpoint's ids (default: ids 0..8)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    numbers = [str(i) for i in range(max_number + 1)]  # whole-number tokens: 0..max_number
    texts = list(corpus) + [' '.join(numbers), CHAT_TEMPLATE, '\n \n\n  ', 'user assistant system']
    if special_ids:
        pieces = sorted({p for t in texts for p in re.findall(PIECES, t)} - set(SPECIAL))
        vocab = {p: i for i, p in enumerate(pieces + ['<|unk|>'])} | special_ids
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token='<|unk|>'))
        tok.add_special_tokens(SPECIAL)
    else:
        tok = Tokenizer(models.WordLevel(unk_token='<|unk|>'))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior='isolated')
    tok.decoder = decoders.Fuse()
    if not special_ids:
        tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<|unk|>', eos_token='<|im_end|>',
                                   pad_token='<|endoftext|>', padding_side='left')
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_policy(out_dir, words=(), seed=0, image_size=112, hidden=128, layers=4, heads=4,
                      vision_depth=4, vision_hidden=64, rope_theta=10.0, mrope=(2, 7, 7),
                      max_number=1000, prompt=None):
    """Write a tiny random Qwen2.5-VL checkpoint into out_dir and return out_dir.
    words: texts whose words the tokenizer must know (queries, labels, prompt); prompt: the
    template saved as prompt.txt so later runs use the words the model was trained on."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    import model as M
    assert 2 * sum(mrope) == hidden // heads, 'mrope sections must sum to head_dim / 2'
    corpus = list(words) + list(M.TEMPLATES.values()) + ([prompt] if prompt else [])
    tok = _tokenizer(corpus, max_number)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=2048,
                         rope_parameters={'rope_type': 'default', 'rope_theta': rope_theta,
                                          'mrope_section': list(mrope)},
                         tie_word_embeddings=True, bos_token_id=ids['<|endoftext|>'],
                         eos_token_id=ids['<|im_end|>'], pad_token_id=ids['<|endoftext|>']),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden, num_heads=4, out_hidden_size=hidden,
                           window_size=image_size, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids['<|image_pad|>'], video_token_id=ids['<|video_pad|>'],
        vision_start_token_id=ids['<|vision_start|>'], vision_end_token_id=ids['<|vision_end|>'],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    net = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    net.generation_config.eos_token_id = [ids['<|im_end|>'], ids['<|endoftext|>']]
    net.generation_config.pad_token_id = ids['<|endoftext|>']
    px = dict(min_pixels=28 * 28, max_pixels=image_size * image_size)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**px), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**px), chat_template=CHAT_TEMPLATE)
    os.makedirs(out_dir, exist_ok=True)
    net.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    if prompt:
        with open(os.path.join(out_dir, 'prompt.txt'), 'w') as f:
            f.write(prompt)
    return out_dir


# Public config.json / generation_config.json values of the two configurations the README's commands use.
QWEN_IDS = {'<|endoftext|>': 151643, '<|im_start|>': 151644, '<|im_end|>': 151645, '<|vision_start|>': 151652,
            '<|vision_end|>': 151653, '<|vision_pad|>': 151654, '<|image_pad|>': 151655, '<|video_pad|>': 151656}
ARCHS = {
    'qwen2.5-vl-7b': dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={'rope_type': 'default', 'rope_theta': 1e6, 'mrope_section': [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14),
        generation=dict(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1),
        pixels=dict(patch_size=14, min_pixels=3136, max_pixels=12845056, image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711])),
    'qwen3-vl-8b': dict(
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, rope_parameters={'rope_type': 'default', 'rope_theta': 5e6,
                                                      'mrope_section': [24, 20, 20], 'mrope_interleaved': True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        generation=dict(do_sample=True, repetition_penalty=1.0, temperature=0.7, top_p=0.8, top_k=20),
        pixels=dict(patch_size=16, size={'shortest_edge': 65536, 'longest_edge': 16777216}, image_mean=[0.5] * 3,
                    image_std=[0.5] * 3)),
}


def build_config_dir(out_dir, arch, layers=None, vision_layers=None, text=None, vision=None, words=()):
    """Write ARCHS[arch] as a checkpoint dir without weights: config.json (layers / vision_layers cut
    the towers; text / vision dicts override other fields, e.g. narrower widths for tests), the public
    generation_config.json (so tests see its repetition penalty and top-k), the real processor settings,
    and a word-level tokenizer with the special tokens at the real ids. -> out_dir."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen3VLConfig, Qwen3VLProcessor
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    import model as M
    spec, qwen3 = ARCHS[arch], arch.startswith('qwen3')
    tc = {**spec['text'], **(text or {}), 'eos_token_id': QWEN_IDS['<|im_end|>'],
          'pad_token_id': QWEN_IDS['<|endoftext|>'],
          'bos_token_id': QWEN_IDS['<|endoftext|>'], 'tie_word_embeddings': False}
    vc = {**spec['vision'], **(vision or {})}
    if layers:
        tc['num_hidden_layers'] = layers
    if vision_layers:  # keep the special blocks that still exist (full attention, deepstack taps)
        vc['depth'] = vision_layers
        for key in ('fullatt_block_indexes', 'deepstack_visual_indexes'):
            if key in vc:
                vc[key] = [i for i in vc[key] if i < vision_layers] or [vision_layers - 1]
    ids = dict(image_token_id=QWEN_IDS['<|image_pad|>'], video_token_id=QWEN_IDS['<|video_pad|>'],
               vision_start_token_id=QWEN_IDS['<|vision_start|>'], vision_end_token_id=QWEN_IDS['<|vision_end|>'])
    config_class = Qwen3VLConfig if qwen3 else Qwen2_5_VLConfig
    cfg = config_class(text_config=tc, vision_config=vc, tie_word_embeddings=False, **ids)
    os.makedirs(out_dir, exist_ok=True)
    cfg.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=QWEN_IDS['<|endoftext|>'], pad_token_id=QWEN_IDS['<|endoftext|>'],
                     eos_token_id=[QWEN_IDS['<|im_end|>'], QWEN_IDS['<|endoftext|>']],
                     **spec['generation']).save_pretrained(out_dir)
    tok = _tokenizer(list(words) + list(M.TEMPLATES.values()), 1000, special_ids=QWEN_IDS)
    px = {k: v for k, v in spec['pixels'].items()}
    image_processor = Qwen2VLImageProcessor(merge_size=2, temporal_patch_size=2, **px)
    video = (Qwen3VLVideoProcessor if qwen3 else Qwen2VLVideoProcessor)(merge_size=2, temporal_patch_size=2, **px)
    processor_class = Qwen3VLProcessor if qwen3 else Qwen2_5_VLProcessor
    processor_class(image_processor=image_processor, tokenizer=tok, video_processor=video,
                    chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)
    return out_dir


def words_of(texts):
    """Helper for callers: every word piece of some texts (for the tokenizer's vocabulary)."""
    return sorted({p for t in texts for p in re.findall(PIECES, t)})
