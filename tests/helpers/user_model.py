"""A researcher's own model folder, built at test time from random initialisation: a tiny
Qwen2-shaped model and a byte-level BPE tokenizer trained in about a second on a few hundred
generated lines, with ChatML special tokens and chat template, saved by `transformers` as a Hub
folder is (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json).

    folder = build(tmp_path / "model")      # the folder, as `--init-from` takes it
    tok = transformers.AutoTokenizer.from_pretrained(folder)

The model's vocabulary (1280 rows) is larger than the tokenizer's ids (as Qwen's and Llama's
embeddings are padded) and larger than the offline task's (1207), the case where the DPO driver
once tokenized `--pairs` with the task's tokenizer without a word.
"""

import random

# ChatML, as Qwen2 writes it (no system prompt added by default).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD = "<|im_end|>", "<|endoftext|>"
MODEL_VOCAB = 1280
MODEL_SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip

_WORDS = (
    "the a film plot story actor scene music ending was is felt looked great good fine dull "
    "awful long short funny sad bright dark slow quick warm cold and but with of to in on "
    "question answer what how many apples pears has gives takes left total each more less"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """`n` lines of generated prose and arithmetic word problems (the tokenizer's training text)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            lines.append(f"Tom has {a} apples and gets {b} more. How many? {a + b}")
        else:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14))) + ".")
    return lines


def train_tokenizer(lines: list[str], vocab_size: int = 600, special=tuple(SPECIAL)):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `lines`, the `special` tokens (default:
    ChatML's) added first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer)
    return backend


def hf_tokenizer(backend=None, *, chat_template: str | None = CHATML, **special):
    """`transformers.PreTrainedTokenizerFast` of `backend` (default: trained on `corpus()`), EOS
    "<|im_end|>", pad "<|endoftext|>", no BOS (as Qwen2's), and `chat_template`."""
    import transformers

    backend = backend or train_tokenizer(corpus())
    tokens = {"eos_token": EOS, "pad_token": PAD, **special}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=chat_template, **tokens
    )


def build(folder, *, seed: int = 0, chat_template: str | None = CHATML, **config):
    """Saves the tiny Qwen2 model and its tokenizer into `folder` with `transformers`; returns the
    folder. `config` overrides the model's config fields."""
    import torch
    import transformers

    tok = hf_tokenizer(chat_template=chat_template)
    shape = {
        **MODEL_SHAPE,
        "vocab_size": MODEL_VOCAB,
        "bos_token_id": None,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **config,
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    # Saved again as `AutoTokenizer` reads it beside a Qwen2 config.json (transformers 5 builds
    # Qwen2's tokenizer class, with its own pre-tokenizer): tokenizer.json is then what a Qwen2
    # folder from the Hub holds, and every reader of it tokenizes alike.
    transformers.AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder
