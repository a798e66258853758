"""Tiny models and tokenizers built offline for the tests (no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "residuals",
    "carry",
    "instruction",
    "following",
    "from",
    "one",
    "model",
    "version",
    "to",
    "the",
    "next",
    "and",
    "task",
    "arithmetic",
    "adds",
    "vectors",
    "tensor",
    "by",
    "tensor",
]


def build_tokenizer(extra_tokens: list[str] | None = None, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": extra_tokens})
    return fast


def model_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            n_positions=64,
            vocab_size=vocab_size,
            bos_token_id=1,
            eos_token_id=2,
        )
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def make_model(arch: str, vocab_size: int, seed: int, **size):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, vocab_size, **size))
    with torch.no_grad():
        for p in model.parameters():  # norms default to ones and biases to zeros: give them structure
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def perturbed(model, seed: int, scale: float = 0.01):
    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return clone


def save(model, tokenizer, folder: Path, dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    folder = Path(folder)
    model.to(dtype).save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def make_family(
    root: Path,
    arch: str,
    *,
    added_tokens: int = 0,
    dtype=torch.float32,
    size: dict | None = None,
    **save_kwargs,
) -> dict:
    """base, instruct (base + noise, optionally with added tokens) and target (base + other noise).

    `size` ({"hidden": .., "layers": ..}) makes larger models, e.g. to outgrow a small disk.
    """
    root = Path(root)
    base_tok = build_tokenizer()
    vocab = len(base_tok)
    base = make_model(arch, vocab, seed=1, **(size or {}))
    inst_tok = base_tok
    instruct = base
    if added_tokens:
        inst_tok = build_tokenizer([f"<|extra_{i}|>" for i in range(added_tokens)])
        instruct = copy.deepcopy(base)
        instruct.resize_token_embeddings(len(inst_tok), mean_resizing=False)
    # one float32 update per weight, as fine-tuning produces: instruct = fl(base + delta)
    instruct = perturbed(instruct, seed=2)
    target = perturbed(base, seed=3)
    return {
        "base": save(base, base_tok, root / f"{arch}-base", dtype, **save_kwargs),
        "instruct": save(instruct, inst_tok, root / f"{arch}-instruct", dtype, **save_kwargs),
        "target": save(target, base_tok, root / f"{arch}-target", dtype, **save_kwargs),
    }


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (tests only: small models)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state
