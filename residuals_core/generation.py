"""Greedy text generation for side-by-side comparisons (the Try tab) and the demo evaluation."""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(path: str | Path, *, device: str = "cpu", token: str | None = None):
    """(model, tokenizer) in float32 on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = (
        AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, token=token).to(device).eval()
    )
    return model, AutoTokenizer.from_pretrained(str(path), token=token)


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
