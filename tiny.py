"""tiny.py: build a tiny random Qwen2.5-VL as an ordinary checkpoint directory (config, weights,
tokenizer with Qwen's special tokens and chat template, image + video processor), so that the
sandbox loads through model.load_policy exactly like a real checkpoint. Nothing is downloaded.

Why the odd settings: with head_dim 32 the default rope_theta 1e6 makes image rows/columns nearly
indistinguishable to the LM; theta 10 and more rotary dims for height/width (mrope [2,7,7]) let a
tiny model read positions (../shared/notes/sandbox-learnability.md). Numbers are whole tokens.
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


def _tokenizer(corpus, max_number):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token='<|unk|>'))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior='isolated')
    tok.decoder = decoders.Fuse()
    numbers = [str(i) for i in range(max_number + 1)]  # whole-number tokens: 0..max_number
    texts = list(corpus) + [' '.join(numbers), CHAT_TEMPLATE, '\n \n\n  ', 'user assistant system']
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


def words_of(texts):
    """Helper for callers: every word piece of some texts (for the tokenizer's vocabulary)."""
    return sorted({p for t in texts for p in re.findall(PIECES, t)})
