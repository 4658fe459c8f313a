"""A random tiny causal LM and a tokenizer built locally, for tests and ``--tiny`` benchmarks.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in milliseconds on a small built-in
corpus, with a ChatML chat template (the same shape SmolLM2 uses), and the model is a randomly initialised Llama.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "Write a short poem about the sea. The sea is wide and blue, the waves are calm and true.",
    "Explain why the sky is blue. Sunlight scatters off air molecules, and blue light scatters the most.",
    "Improve the draft answer below. Keep the style and the length close to the draft.",
    "Below is a question and a draft answer. Rewrite the draft so that it is better.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20, plus, minus, times, equals.",
    "def add(a, b): return a + b  # Python code with numbers 42 and 3.14",
    "Hello! How can I help you today? Thank you, that is very helpful.",
    "A good answer is correct, clear, complete and concise. A bad answer is vague or wrong.",
    "system user assistant: the improved answer, the draft answer, the reference answer.",
]


def build_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials; ``eos`` is ``<|im_end|>`` (end of an assistant turn), like SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random Llama with ``hidden_size`` 32 and 2 layers: small enough that a training step takes milliseconds."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # Model cards render `base_model` from this; a config-built model would otherwise show "None".
    model.config._name_or_path = "trl-sgpo/tiny-random-llama"
    return model


def build_tiny_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A random one-label Llama classifier (a reward model), one layer of width 16."""
    from transformers import LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)
