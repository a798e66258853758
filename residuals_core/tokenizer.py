"""Tokenizer files and vocabulary alignment.

Folders are handled by copying tokenizer files verbatim (exactly what the model was trained
with, chat template included); the length of a tokenizer decides how many vocabulary rows a
result needs. For model instances, the `residuals` package's in-place behaviours are kept:
PAD added when missing, embeddings resized, new rows zeroed (transformers mean-initialises them).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ResidualsError

if TYPE_CHECKING:  # the folder functions run without torch
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_PAD_TOKEN = "[PAD]"


def tokenizer_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    found = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    found += sorted(folder.glob("*.tiktoken"))
    return found


def has_tokenizer(folder: Path) -> bool:
    return any(p.name != "special_tokens_map.json" for p in tokenizer_files(folder))


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for path in tokenizer_files(src):
        shutil.copy2(path, Path(dst) / path.name)
        copied.append(path.name)
    return copied


def load_tokenizer(name_or_path: str | Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:  # transformers raises many types here
        raise ResidualsError(
            f"Could not load a tokenizer from {name_or_path} ({type(exc).__name__}: {exc}).",
            "Pass the instruct model's tokenizer explicitly (instruct_tokenizer=... or instruct_tokenizer_name=...).",
        ) from exc


def tokenizer_length(folder: Path) -> int | None:
    """len(tokenizer) of the tokenizer saved in `folder`, or None when it has none."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    if (folder / "tokenizer.json").is_file():
        # fast path, no transformers import: the vocabulary and added tokens of tokenizer.json, plus any
        # added token that only tokenizer_config.json declares
        from tokenizers import Tokenizer

        from .checkpoint import read_json

        try:
            count = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        except Exception as exc:  # the tokenizers library raises its own untyped Exception
            raise ResidualsError(
                f"{folder / 'tokenizer.json'} is not a readable tokenizer ({exc}).",
                "Copy or download the tokenizer files again, or pass the right tokenizer explicitly "
                "(--instruct-tokenizer / instruct_tokenizer_name).",
            ) from None
        config = folder / "tokenizer_config.json"
        if config.is_file():
            declared = read_json(config).get("added_tokens_decoder") or {}
            try:
                ids = [int(i) for i in declared]
            except (TypeError, ValueError):
                raise ResidualsError(
                    f"{config}: added_tokens_decoder has keys that are not token ids.",
                    'Fix or replace tokenizer_config.json (its keys are token ids such as "32000").',
                ) from None
            count = max([count, *(i + 1 for i in ids)])
        return count
    return len(load_tokenizer(folder))


def grow_embeddings(model: torch.nn.Module, rows: int) -> torch.nn.Module:
    """Grow a model's embeddings (and output head) to `rows` with zeroed new rows; never shrink.

    transformers mean-initialises new rows; zeros keep them from contaminating the residual.
    """
    import torch

    current = model.get_input_embeddings().weight.shape[0]
    if rows <= current:
        return model
    model.resize_token_embeddings(rows)
    count = rows - current
    with torch.no_grad():
        model.get_input_embeddings().weight[-count:] = 0
        output = model.get_output_embeddings()
        if output is not None:
            output.weight[-count:] = 0
            if getattr(output, "bias", None) is not None:
                output.bias[-count:] = 0
    return model


def resize_model_to_tokenizer(model: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """Grow a model's embeddings to len(tokenizer) with zeroed new rows; never shrink."""
    return grow_embeddings(model, len(tokenizer))


def align_tokenizer_and_embeddings(model: torch.nn.Module, tokenizer):
    """Add a PAD token when the tokenizer has none, resize embeddings, zero the new rows."""
    if tokenizer.pad_token is None and tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN}):
        grow_embeddings(model, len(tokenizer))
    return model, tokenizer
