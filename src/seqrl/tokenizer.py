"""A character-level tokenizer for the tiny random-init models (offline, deterministic).

Every printable ASCII character (space .. ~) and the newline is one token; the Qwen/ChatML special tokens are
atomic added tokens, so chat-formatted prompts look exactly like the real Qwen models' prompts, only spelled one
character at a time. Characters outside the vocabulary map to `<|unk|>`.

Vocabulary (fixed order, so the ids never change):
    0 <|endoftext|> (pad)  1 <|im_start|>  2 <|im_end|> (eos)  3 <|vision_start|>  4 <|vision_end|>
    5 <|image_pad|>  6 <|video_pad|>  7 <|unk|>  8 "\\n"  9.. printable ASCII from " " (9) to "~" (103)
`<|video_pad|>` is not used by the project; it is in the vocabulary because the Qwen2.5-VL processor looks its id
up, and an unknown token would otherwise alias `<|unk|>` and be taken for a video token.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    UNK_TOKEN,
)
CHARACTERS = ("\n",) + tuple(chr(code) for code in range(32, 127))

# ChatML, as the Qwen models use it: a user turn is "<|im_start|>user\n{content}<|im_end|>\n"; content is a string
# or a list of parts ({"type": "image"} or {"type": "text", "text": ...}); the generation prompt opens the
# assistant turn. No default system prompt (the tiny models have short contexts).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)

PADDING_SIDES = ("left", "right")


def build_char_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Build the character tokenizer (104 tokens, ids as in the module docstring) with a ChatML chat template.

    `padding_side` is "left" (prompts for generation) or "right". The result saves with `save_pretrained` and
    reloads identically with `AutoTokenizer.from_pretrained`.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} is not allowed; use one of {PADDING_SIDES}")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one piece per character
    backend.decoder = decoders.Fuse()  # join the pieces back without separators
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
