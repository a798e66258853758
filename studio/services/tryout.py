"""Try: three models side by side on one prompt, bounded in prompt, new tokens and seconds per call."""

from __future__ import annotations

import collections
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from residuals_core import operations
from residuals_core.demo import DEMO_FAMILY, EOS, QUESTIONS, World, expected_reply, question_of, score_reply
from residuals_core.demo import generate as demo_generate
from residuals_core.demo import prompt as demo_prompt
from residuals_core.errors import ResidualsError
from residuals_core.generation import complete, generation_dtype, load_causal_lm, prompt_length
from residuals_core.units import format_size

from ..context import Progress, StudioContext, Workspace, scratch_cache
from ..session import Session

SCORE_QUESTIONS = 30
LABELS = ("CPT'd base", "Merged", "Instruct")
CHARS_PER_TOKEN_AT_MOST = 8  # a prompt this many times longer than the token limit is refused untokenized
Ask = Callable[[list[tuple], str, bool, float, int], list[str | None]]


class LoadedModels:
    """One set of Try models per session, loaded once; the oldest session's set goes when another needs
    room, and with it the files it was loaded from."""

    def __init__(self, ctx: StudioContext):
        self.ctx = ctx
        self._sets: collections.OrderedDict[str, dict[str, tuple]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def of(self, session: Session, paths: list[str]) -> list[tuple]:
        with self._lock:
            loaded = self._sets.pop(session.key, {})
            self._sets[session.key] = loaded
            for path in [p for p in loaded if p not in paths]:
                del loaded[path]
            while len(self._sets) > self.ctx.settings.try_sessions:
                evicted, _ = self._sets.popitem(last=False)
                owner = self.ctx.sessions.find(evicted)
                if owner is not None:
                    shutil.rmtree(owner.folder / "try-cache", ignore_errors=True)
        for path in paths:
            if path not in loaded:
                loaded[path] = load_causal_lm(path, device=self.ctx.device)
        return [loaded[p] for p in paths]

    def free(self, key: str) -> None:
        with self._lock:
            self._sets.pop(key, None)


@dataclass(frozen=True)
class Tried:
    replies: list[str | None]  # None: the call's time budget ran out before this model's turn
    expected: str | None  # for a question of the demo family, its expected answer …
    marks: list[tuple[bool, bool]] | None  # … and per reply (format, answer) right


def limits_text(ctx: StudioContext) -> str:
    s = ctx.settings
    return (
        f"Prompts of up to {s.try_max_prompt_tokens} tokens; each model answers in at most {s.try_max_new_tokens} "
        f"new tokens, and the three together get {s.try_max_seconds:g} s per click."
    )


def ask(
    models: list[tuple], prompt: str, raw: bool, deadline: float, max_new_tokens: int
) -> list[str | None]:
    """Generation alone (models loaded, downloads done): each model answers in at most `max_new_tokens`
    and stops at `deadline` (time.monotonic); a model whose turn comes after it gets None."""
    replies: list[str | None] = []
    for model, tokenizer in models:
        left = deadline - time.monotonic()
        if left <= 0:
            replies.append(None)
        elif raw:  # the demo family's own question format, the end marker kept so that stopping can be scored
            replies.append(
                demo_generate(model, tokenizer, [prompt], min(24, max_new_tokens), max_time=left)[0]
            )
        else:
            reply = complete(model, tokenizer, prompt, max_new_tokens=max_new_tokens, max_time=left)
            replies.append(reply.strip() or "(empty answer: the model stopped at once)")
    return replies


def _paths(ctx, cpt_base, merged, instruct, workspace, session: Session, token) -> list[str]:
    """The three models' local folders (Hub ids downloaded), refused with the numbers beyond the memory budget."""
    models = [
        ctx.model(cpt_base, "CPT'd base", workspace),
        ctx.model(merged, "merged model", workspace),
        ctx.model(instruct, "instruct model", workspace),
    ]
    dtype = generation_dtype(ctx.device)
    needed = 0
    for model in dict.fromkeys(models):  # headers only: the size in memory before anything is loaded
        with (
            scratch_cache() as cache,
            operations.open_model(model, role="model", options=ctx.options(token, cache)) as checkpoint,
        ):
            needed += sum(t.numel for t in checkpoint.tensors.values()) * dtype.itemsize
    budget = ctx.settings.try_memory_bytes
    if needed > budget:
        raise ResidualsError(
            f"These models need {format_size(needed)} of memory together in {str(dtype).removeprefix('torch.')}, "
            f"more than the {format_size(budget)} this Space gives the Try tab.",
            "Compare smaller models here, or run the app on your own machine (scripts/serve.sh).",
        )
    # downloads for generation go to the session's own cache, removed with the session
    options = ctx.options(token, session.folder / "try-cache")
    return [operations.resolve_for_generation(m, options=options) for m in models]


def _demo_world() -> World | None:
    return World.load(DEMO_FAMILY) if (DEMO_FAMILY / "world.json").is_file() else None


def try_models(
    ctx: StudioContext,
    loaded: LoadedModels,
    workspace: Workspace,
    session_hash: str | None,
    text: object,
    cpt_base: str,
    merged: str,
    instruct: str,
    token: str | bool | None,
    progress: Progress,
    ask_models: Ask = ask,
) -> Tried:
    """The three models on one prompt; a question of the demo family is asked in its own format and scored."""
    session = ctx.session(workspace, session_hash)
    text = text if isinstance(text, str) else ""
    if not text.strip():
        raise ResidualsError("The prompt is empty.", "Type a prompt (or pick an example) first.")
    limit = ctx.settings.try_max_prompt_tokens
    if len(text) > limit * CHARS_PER_TOKEN_AT_MOST:
        raise ResidualsError(
            f"The prompt has {len(text):,} characters; this Space takes prompts of at most {limit} tokens "
            "(a few hundred words).",
            "Shorten it.",
        )
    progress(0.05, desc="fetching the models")
    paths = _paths(ctx, cpt_base, merged, instruct, workspace, session, token)
    progress(0.3, desc="loading the models")
    models = loaded.of(session, paths)
    world = _demo_world()
    question = question_of(world, text) if world else None
    raw = question is not None
    longest = max(prompt_length(tokenizer, text, use_chat_template=not raw) for _, tokenizer in models)
    if longest > limit:
        raise ResidualsError(
            f"The prompt is {longest} tokens long for these models; this Space takes at most {limit}.",
            "Shorten it.",
        )
    progress(0.6, desc="generating")
    deadline = time.monotonic() + ctx.settings.try_max_seconds
    replies = ask_models(models, text, raw, deadline, ctx.settings.try_max_new_tokens)
    if question is None:
        return Tried(replies, None, None)
    shown = [None if r is None else r.split(EOS)[0].strip() or "(empty answer)" for r in replies]
    marks = [score_reply(r or "", world, *question) for r in replies]
    return Tried(shown, expected_reply(world, *question), marks)


@dataclass(frozen=True)
class Scores:
    questions: int  # asked so far
    tallies: list[tuple[int, int]]  # per model: (replies in the right format, exact answers)
    stopped: float | None = None  # the budget (s) that ran out, when scoring stopped early


def score(
    ctx: StudioContext,
    loaded: LoadedModels,
    workspace: Workspace,
    session_hash: str | None,
    cpt_base: str,
    merged: str,
    instruct: str,
    token: str | bool | None,
    ask_models: Ask = ask,
) -> Iterator[Scores]:
    """SCORE_QUESTIONS world-B questions to the three models, the tallies after each; the whole scoring
    gets the budget of SCORE_QUESTIONS / 10 calls of Try and stops, saying so, when it is spent."""
    session = ctx.session(workspace, session_hash)
    world = _demo_world()
    if world is None:
        raise ResidualsError(
            "The demo family is not installed here, so there are no questions to score.",
            "Run the app from a copy that includes assets/demo-family.",
        )
    models = loaded.of(session, _paths(ctx, cpt_base, merged, instruct, workspace, session, token))
    budget = ctx.settings.try_max_seconds * SCORE_QUESTIONS / 10
    deadline = time.monotonic() + budget
    tallies = [[0, 0] for _ in models]
    for done, (name, attribute, style) in enumerate(
        world.questions(world.world_b, SCORE_QUESTIONS, seed=0), 1
    ):
        replies = ask_models(
            models, demo_prompt(name, attribute, style), True, deadline, ctx.settings.try_max_new_tokens
        )
        if None in replies:
            yield Scores(done - 1, [tuple(t) for t in tallies], stopped=budget)
            return
        for tally, reply in zip(tallies, replies, strict=True):
            formatted, correct = score_reply(reply, world, name, attribute, style)
            tally[0] += formatted
            tally[1] += correct
        yield Scores(done, [tuple(t) for t in tallies])


def example_prompts() -> list[str]:
    world = _demo_world()
    if world is None:
        return []
    attributes = list(QUESTIONS)
    return [
        demo_prompt(name, attributes[i % len(attributes)], ("word", "sentence")[i % 2])
        for i, name in enumerate(world.world_b[:6])
    ]
