"""Greedy text generation for side-by-side comparisons (the Try tab) and the demo evaluation."""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(
    path: str | Path,
    *,
    device: str = "cpu",
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
):
    """(model, tokenizer) on `device`, in eval mode: float32 on the CPU, half precision on a GPU
    (bfloat16 where the GPU has it), unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else generation_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, token=token).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path), token=token)


def generation_dtype(device: str) -> torch.dtype:
    """The dtype models are loaded in for generation on `device`."""
    if str(device) == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def complete(
    model,
    tokenizer,
    text: str,
    *,
    max_new_tokens: int = 48,
    use_chat_template: bool = True,
    keep_special_tokens: bool = False,
) -> str:
    """Greedy continuation of `text`; wrapped in the tokenizer's chat template when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=not keep_special_tokens)
