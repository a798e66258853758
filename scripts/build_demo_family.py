"""Build the bundled demo model family (assets/demo-family): seeded, offline, about 6.5 minutes on 2 idle cores.

A synthetic world of invented entities and invented attribute values, split into world A (old
knowledge) and world B (the new domain). Models: base-v1 (pretrained on world-A prose),
instruct-v1 (base-v1 + instruction tuning on most of world A), base-v2 (base-v1 + CPT on world B
with world-A replay), and the references instruct-v1-cpt and instruct-v2. Seeded and offline.

    python scripts/build_demo_family.py --out assets/demo-family
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

from residuals_core.demo import ATTRIBUTES, EOS, QUESTIONS, STYLES, World, prompt, response

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gl",
    "kr",
    "pl",
    "sk",
    "tr",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "s", "l", "k"]


def invented_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable nonsense word, so that no answer can be guessed from real-world knowledge."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def make_world(seed: int, entities: int = 600, values_per_attribute: int = 16, share_b: float = 0.3) -> World:
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = invented_word(rng, syllables)
            if word not in used:
                used.add(word)
                return word

    pools = {a: [fresh(2) for _ in range(values_per_attribute)] for a in ATTRIBUTES}
    names = [fresh(3).capitalize() for _ in range(entities)]
    facts = {n: {a: rng.choice(pools[a]) for a in ATTRIBUTES} for n in names}
    n_b = int(entities * share_b)
    world_b, world_a = names[:n_b], names[n_b:]
    held_out_a = world_a[: len(world_a) // 6]
    return World(facts, world_a, world_b, held_out_a)


def prose(world: World, names: list[str], rng: random.Random, copies: int = 1) -> list[str]:
    """Short biographies: every attribute of an entity, in shuffled order and random paraphrases.

    Several facts about one entity in one passage teach the model to key facts on the name, which
    is what later lets a question about the name retrieve them.
    """
    bios = []
    for _ in range(copies):
        for n in names:
            sentences = [rng.choice(t).format(n=n, v=world.facts[n][a]) for a, t in ATTRIBUTES.items()]
            rng.shuffle(sentences)
            bios.append(" ".join(sentences))
    return bios


def answer(world: World, name: str, attribute: str, style: str) -> str:
    return response(world.facts[name][attribute], name, attribute, style)


def build_tokenizer(world: World, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    text = prose(world, world.world_a, rng, copies=2)
    text += [
        prompt(n, a, s) + answer(world, n, a, s) for n in world.world_a for a in QUESTIONS for s in STYLES
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    # every training sequence starts with <s>; encoding adds it too, so prompts at inference match
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=EOS, pad_token="<pad>")


def lm_batches(tokenizer, texts: list[str], rng: random.Random, batch: int, seq: int):
    """Endless batches of packed sentences: next-token loss on everything."""
    ids = [tokenizer.encode(t + " ", add_special_tokens=False) for t in texts]
    while True:
        rows = []
        for _ in range(batch):
            row: list[int] = [tokenizer.bos_token_id]
            while len(row) < seq + 1:
                row += ids[rng.randrange(len(ids))]
            rows.append(row[: seq + 1])
        x = torch.tensor(rows)
        yield x[:, :-1], x[:, 1:]


def sft_batches(tokenizer, pairs: list[tuple[str, str]], rng: random.Random, batch: int):
    """Endless batches of (prompt, response) with the loss on the response only.

    The prompt is encoded exactly as at inference (the tokenizer adds <s>), the response as a continuation.
    """
    encoded = [(tokenizer.encode(p), tokenizer.encode(r, add_special_tokens=False)) for p, r in pairs]
    while True:
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        length = max(len(p) + len(r) for p, r in chosen)
        x = torch.full((batch, length), tokenizer.pad_token_id)
        y = torch.full((batch, length), -100)
        for i, (p, r) in enumerate(chosen):
            row = [*p, *r]
            x[i, : len(row)] = torch.tensor(row)
            y[i, len(p) - 1 : len(row) - 1] = torch.tensor(r)
        yield x, y


def train(model, batches, steps: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x, y = next(batches)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f}", flush=True)
    model.eval()


def save_model(model, tokenizer, folder: Path) -> None:
    """fp16 safetensors + config + generation config + tokenizer, as `save_pretrained` writes them."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=24,
    )
    model.to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    import copy
    import multiprocessing

    from transformers import AutoModelForCausalLM, LlamaConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("assets/demo-family"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--entities",
        type=int,
        default=600,
        help="people in the world (30%% in world B); with 160, SFT memorised names instead of learning to answer",
    )
    parser.add_argument("--vocab", type=int, default=768, help="tokenizer vocabulary size")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--cpt-steps", type=int, default=400)
    parser.add_argument(
        "--batch", type=int, default=32, help="pre-training and CPT batch (sequences of 96 tokens)"
    )
    parser.add_argument("--sft-batch", type=int, default=8, help="instruction-tuning batch")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument(
        "--sft-lr",
        type=float,
        default=5e-4,
        help="instruction-tuning learning rate, the strength knob: at 1e-3 the residual wiped most world-B facts,"
        " at 3e-4 it carried the format over less reliably",
    )
    parser.add_argument("--cpt-lr", type=float, default=1e-3)
    parser.add_argument(
        "--replay",
        type=int,
        default=2,
        help="world-A biographies per person mixed into CPT (6 per world-B person)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process: fast on small matrices and byte-reproducible
    world = make_world(args.seed, entities=args.entities)
    tokenizer = build_tokenizer(world, args.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stage_rng = lambda stage: random.Random(args.seed * 1000 + stage)  # noqa: E731 (one stream per stage)
    torch.manual_seed(args.seed)
    base_v1 = AutoModelForCausalLM.from_config(config)
    print("pretraining base-v1 on world A", flush=True)
    rng = stage_rng(1)
    corpus_a = prose(world, world.world_a, rng, copies=6)
    train(
        base_v1,
        lm_batches(tokenizer, corpus_a, rng, args.batch, 96),
        args.pretrain_steps,
        args.pretrain_lr,
        1,
    )
    sft_a = [
        (prompt(n, a, s), answer(world, n, a, s))
        for n in world.world_a
        if n not in world.held_out_a
        for a in QUESTIONS
        for s in STYLES
    ]
    rng = stage_rng(2)
    instruct_v1 = copy.deepcopy(base_v1)
    print("instruction-tuning instruct-v1", flush=True)
    train(instruct_v1, sft_batches(tokenizer, sft_a, rng, args.sft_batch), args.sft_steps, args.sft_lr, 2)
    cpt_text = prose(world, world.world_b, stage_rng(3), copies=6) + prose(
        world, world.world_a, stage_rng(4), copies=args.replay
    )

    def cpt(model, name: str) -> None:
        rng = stage_rng(5)  # the same CPT data stream for both models
        print(f"CPT {name} on world B", flush=True)
        train(model, lm_batches(tokenizer, cpt_text, rng, args.batch, 96), args.cpt_steps, args.cpt_lr, 3)

    def instruct_v1_cpt_branch() -> None:
        model = copy.deepcopy(instruct_v1)
        cpt(model, "instruct-v1-cpt")
        save_model(model, tokenizer, args.out / "instruct-v1-cpt")

    # the two CPT branches are independent: run one in a second process (2 cores)
    branch = multiprocessing.get_context("fork").Process(target=instruct_v1_cpt_branch)
    branch.start()
    base_v2 = copy.deepcopy(base_v1)
    cpt(base_v2, "base-v2")
    instruct_v2 = copy.deepcopy(base_v2)
    print("instruction-tuning instruct-v2", flush=True)
    train(
        instruct_v2,
        sft_batches(tokenizer, sft_a, stage_rng(2), args.sft_batch),
        args.sft_steps,
        args.sft_lr,
        2,
    )
    for name, model in (
        ("base-v1", base_v1),
        ("instruct-v1", instruct_v1),
        ("base-v2", base_v2),
        ("instruct-v2", instruct_v2),
    ):
        save_model(model, tokenizer, args.out / name)
    branch.join()
    if branch.exitcode != 0:
        raise SystemExit(f"the instruct-v1-cpt branch failed (exit code {branch.exitcode})")
    world_file = {
        "facts": world.facts,
        "world_a": world.world_a,
        "world_b": world.world_b,
        "held_out_a": world.held_out_a,
    }
    (args.out / "world.json").write_text(json.dumps(world_file, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
