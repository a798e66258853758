"""One error type whose message always says what went wrong and what to do about it."""

from __future__ import annotations


class ResidualsError(ValueError):
    """A problem with the user's input or environment, with the fix in the message.

    Subclasses ValueError so that code written against the `residuals` package, which raises
    ValueError for bad shapes and tokenizers, keeps catching it.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}")
