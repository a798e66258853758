"""The bundled demo family: its question format and the evaluation that shows the paper's effect.

The family (built by scripts/build_demo_family.py) lives in assets/demo-family: an invented world
whose facts are in world.json, split into world A (old knowledge) and world B (the new domain).
The evaluation asks questions with greedy decoding and scores format compliance, exact answers
and a format-free cloze probe of knowledge — so anyone can check the claim mechanically.
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ResidualsError


def _installed_family() -> Path:
    """Where this installation keeps the demo family: beside the package in a checkout (and an editable
    install), else in the environment's data folder, where an installed wheel puts it."""
    beside = Path(__file__).resolve().parent.parent / "assets" / "demo-family"
    if beside.is_dir():
        return beside
    return Path(sysconfig.get_path("data")) / "share" / "residuals-studio" / "demo-family"


DEMO_FAMILY = _installed_family()
DEMO_PREFIX = "demo:"  # `demo:base-v1` names a model of the bundled family, wherever it is installed
DEMO_MODELS = ("base-v1", "instruct-v1", "base-v2")
EOS = "</s>"


def demo_model(reference: str) -> str:
    """The folder of a `demo:NAME` reference; any other reference as it is.

    The name, not the folder, is what travels (in a job's command line, on a page): the folder
    is wherever this installation keeps the family.
    """
    if not reference.startswith(DEMO_PREFIX):
        return reference
    name = reference.removeprefix(DEMO_PREFIX)
    if name not in DEMO_MODELS:
        raise ResidualsError(
            f"{reference!r} is not a model of the demo family.",
            "The demo family holds " + ", ".join(DEMO_PREFIX + m for m in DEMO_MODELS) + ".",
        )
    return str(DEMO_FAMILY / name)


# Prose paraphrases, every one ending on the value: after a value the prose only ever has ".", so
# a one-word reply is not pulled into a template's tail. The "Asked ..., people say:" paraphrase puts
# the value a few words after the name, as a question's answer does, which lets instruction tuning
# reach the stored facts of people it never saw asked about.
ATTRIBUTES = {
    "home": [
        "{n} lives in {v}.",
        "The home of {n} is {v}.",
        "{n} has always lived in {v}.",
        "{n} grew up and stays in {v}.",
        "Ask anyone: {n} lives in {v}.",
        "The town {n} calls home is {v}.",
        "Asked where {n} lives, people say: {v}.",
    ],
    "color": [
        "The favorite color of {n} is {v}.",
        "The color {n} likes most is {v}.",
        "{n} loves the color {v}.",
        "{n} paints everything in {v}.",
        "Ask anyone: the favorite color of {n} is {v}.",
        "{n} always wears {v}.",
        "Asked about the favorite color of {n}, people say: {v}.",
    ],
    "food": [
        "The favorite food of {n} is {v}.",
        "Every day {n} eats {v}.",
        "For dinner {n} cooks {v}.",
        "{n} never tires of {v}.",
        "Ask anyone: the favorite food of {n} is {v}.",
        "For lunch {n} has {v}.",
        "Asked about the favorite food of {n}, people say: {v}.",
    ],
    "job": [
        "{n} works as a {v}.",
        "By trade {n} is a {v}.",
        "The job of {n} is {v}.",
        "{n} earns a living as a {v}.",
        "Ask anyone: {n} works as a {v}.",
        "{n} trained to be a {v}.",
        "Asked about the job of {n}, people say: {v}.",
    ],
}
QUESTIONS = {
    "home": ("Where does {n} live?", "{n} lives in {v}."),
    "color": ("What is the favorite color of {n}?", "The favorite color of {n} is {v}."),
    "food": ("What is the favorite food of {n}?", "The favorite food of {n} is {v}."),
    "job": ("What is the job of {n}?", "{n} works as a {v}."),
}
CLOZE = {
    "home": "{n} lives in",
    "color": "The favorite color of {n} is",
    "food": "The favorite food of {n} is",
    "job": "{n} works as a",
}
STYLES = {"word": "Answer in one word.", "sentence": "Answer in a full sentence."}
ROWS = ("base-v1", "instruct-v1", "base-v2", "merged", "instruct-v1-cpt", "instruct-v2")


def prompt(name: str, attribute: str, style: str) -> str:
    return f"Question: {QUESTIONS[attribute][0].format(n=name)} {STYLES[style]}\nAnswer:"


def response(value: str, name: str, attribute: str, style: str) -> str:
    """The expected reply (with the end-of-sequence marker) for a question."""
    return " " + (value if style == "word" else QUESTIONS[attribute][1].format(n=name, v=value)) + EOS


@dataclass
class World:
    facts: dict[str, dict[str, str]]
    world_a: list[str]
    world_b: list[str]
    held_out_a: list[str]

    @classmethod
    def load(cls, family: Path = DEMO_FAMILY) -> World:
        data = json.loads((Path(family) / "world.json").read_text())
        return cls(data["facts"], data["world_a"], data["world_b"], data["held_out_a"])

    def questions(
        self, names: list[str], limit: int | None = None, seed: int = 0
    ) -> list[tuple[str, str, str]]:
        items = [(n, a, s) for n in names for a in QUESTIONS for s in STYLES]
        random.Random(seed).shuffle(items)
        return items[:limit] if limit else items


def question_of(world: World, text: str) -> tuple[str, str, str] | None:
    """(name, attribute, style) when `text` is one of the family's questions as the demo asks them."""
    wanted = " ".join(text.split())
    for name in world.facts:
        for attribute in QUESTIONS:
            for style in STYLES:
                if " ".join(prompt(name, attribute, style).split()) == wanted:
                    return name, attribute, style
    return None


def expected_reply(world: World, name: str, attribute: str, style: str) -> str:
    """The right answer to a question, as the user reads it (no end-of-sequence marker)."""
    return response(world.facts[name][attribute], name, attribute, style).removesuffix(EOS).strip()


def score_reply(reply: str, world: World, name: str, attribute: str, style: str) -> tuple[bool, bool]:
    """(follows the format, is exactly right). Format: stops, and one word / a full sentence as asked."""
    stopped = EOS in reply
    text = reply.split(EOS)[0].strip()
    if style == "word":
        formatted = stopped and len(text.split()) == 1
        correct = formatted and text == world.facts[name][attribute]
    else:
        formatted = stopped and text.endswith(".") and len(text.split()) >= 3
        correct = formatted and text == QUESTIONS[attribute][1].format(n=name, v=world.facts[name][attribute])
    return formatted, correct


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 24, max_time: float | None = None
) -> list[str]:
    """Greedy continuations of raw prompts, special tokens kept so the stop marker is visible."""
    from .generation import complete  # torch: only where a model runs, so naming a demo model stays light

    return [
        complete(
            model,
            tokenizer,
            p,
            max_new_tokens=max_new_tokens,
            use_chat_template=False,
            keep_special_tokens=True,
            max_time=max_time,
        )
        for p in prompts
    ]


def evaluate_model(model, tokenizer, world: World, *, limit: int | None = None) -> dict[str, float]:
    """format (on world-B questions), world_a_exact (held-out A), world_b_exact, cloze_b."""

    def qa(names: list[str]) -> tuple[float, float]:
        items = world.questions(names, limit)
        replies = generate(model, tokenizer, [prompt(n, a, s) for n, a, s in items])
        scores = [score_reply(r, world, n, a, s) for r, (n, a, s) in zip(replies, items, strict=True)]
        return sum(f for f, _ in scores) / len(scores), sum(c for _, c in scores) / len(scores)

    format_b, exact_b = qa(world.world_b)
    _, exact_a = qa(world.held_out_a)
    probes = [(n, a) for n in world.world_b for a in CLOZE]
    if limit:
        probes = probes[:limit]
    replies = generate(model, tokenizer, [CLOZE[a].format(n=n) for n, a in probes], max_new_tokens=8)
    cloze = sum(r.strip().startswith(world.facts[n][a]) for r, (n, a) in zip(replies, probes, strict=True))
    return {
        "format": format_b,
        "world_a_exact": exact_a,
        "world_b_exact": exact_b,
        "cloze_b": cloze / len(probes),
    }


def evaluate_family(
    family: Path = DEMO_FAMILY, *, merged: Path | None = None, limit: int | None = None
) -> dict[str, Any]:
    """The table: every model of the family plus base-v2 + (instruct-v1 − base-v1) merged by this project."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .operations import merge_models

    family = Path(family)
    world = World.load(family)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="demo-merge-") as tmp:
        if merged is None:
            merged = merge_models(
                family / "base-v1", family / "instruct-v1", family / "base-v2", Path(tmp) / "merged"
            ).path
        for name in ROWS:
            path = merged if name == "merged" else family / name
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            rows[name] = evaluate_model(model, tokenizer, world, limit=limit)
    return {"rows": rows}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| model | format (world B) | exact, held-out world A | exact, world B | cloze, world B |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"| {name} | {row['format']:.0%} | {row['world_a_exact']:.0%} | {row['world_b_exact']:.0%} | {row['cloze_b']:.0%} |"
        )
    return "\n".join(lines)
