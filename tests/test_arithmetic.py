"""arithmetic.plan_tensors on its own: which tensors meet, how vocabulary rows grow, what is refused."""

import pytest
import torch

from residuals_core.arithmetic import plan_tensors
from residuals_core.checkpoint import StateDictSource
from residuals_core.dtypes import BFLOAT16
from residuals_core.errors import ResidualsError


def source(label: str, vocab: int = 10, extra: dict | None = None, **shapes) -> StateDictSource:
    state = {"embed.weight": torch.zeros(vocab, 4), "layer.0.w": torch.zeros(4, 4), **(extra or {})}
    state.update({name.replace("__", "."): torch.zeros(*shape) for name, shape in shapes.items()})
    return StateDictSource(state, label=label, vocab_size=vocab)


def keep(info):
    return info.dtype


def test_same_tensors_give_one_output_each_with_every_operand():
    base, instruct = source("base"), source("instruct")
    plan = plan_tensors([("base", base), ("instruct", instruct)], out_dtype=keep, normalize_embeddings=True)
    assert [o.name for o in plan.outputs] == ["embed.weight", "layer.0.w"]
    assert all([s for s, _ in o.operands] == [base, instruct] for o in plan.outputs)
    assert plan.total_bytes == (10 * 4 + 16) * 4


def test_vocabulary_rows_grow_to_the_largest_and_to_the_tokenizer_with_a_note():
    base, instruct = source("base", vocab=10), source("instruct", vocab=12)
    plan = plan_tensors(
        [("base", base), ("instruct", instruct)], out_dtype=keep, normalize_embeddings=True,
        vocab_sizes=[10, 12], min_vocab_rows=13, pad_from={"instruct": "base"},
    )  # fmt: skip
    embed = plan.outputs[0]
    assert embed.shape == (13, 4) and plan.vocab_rows == 13 and plan.notes
    assert embed.fill_for(1) == (base, "embed.weight")  # the instruct side's missing rows come from the base
    with pytest.raises(ResidualsError, match="Shape mismatch in the vocabulary rows"):
        plan_tensors([("base", base), ("instruct", instruct)], out_dtype=keep, normalize_embeddings=False,
                     vocab_sizes=[10, 12])  # fmt: skip


def test_different_architectures_are_refused_by_name_and_shape():
    base = source("base")
    with pytest.raises(ResidualsError, match=r"missing from instruct: .*layer\.1\.w|only in base"):
        plan_tensors([("base", source("b", extra={"layer.1.w": torch.zeros(4, 4)})), ("instruct", base)],
                     out_dtype=keep, normalize_embeddings=True)  # fmt: skip
    with pytest.raises(ResidualsError, match="have different shapes"):
        plan_tensors([("base", base), ("instruct", source("i", extra={"layer.0.w": torch.zeros(4, 5)}))],
                     out_dtype=keep, normalize_embeddings=True)  # fmt: skip


def test_a_tokenizer_that_would_grow_the_vocabulary_absurdly_is_refused():
    base, instruct = source("base", vocab=10), source("instruct", vocab=10)
    with pytest.raises(ResidualsError, match="corrupt tokenizer"):
        plan_tensors([("base", base), ("instruct", instruct)], out_dtype=keep, normalize_embeddings=True,
                     vocab_sizes=[10, 10], min_vocab_rows=10_000)  # fmt: skip


def test_the_output_dtype_is_chosen_per_tensor():
    plan = plan_tensors([("base", source("b")), ("instruct", source("i"))], out_dtype=lambda info: torch.bfloat16,
                        normalize_embeddings=True)  # fmt: skip
    assert {o.dtype for o in plan.outputs} == {BFLOAT16}


@pytest.mark.parametrize(
    ("target_value", "residual_value", "out_dtype", "refused"),
    [
        (1.0, 0.5, torch.bfloat16, False),  # small: the norms prove it finite
        (1e30, 1e30, torch.bfloat16, False),  # squares overflow float32, the values do not: checked, written
        (3e38, 3e38, torch.bfloat16, True),  # the sum overflows float32 itself
        (3.3e38, 0.0, torch.bfloat16, False),  # at the top of bfloat16's range, still finite
        (60000.0, 10000.0, torch.float16, True),  # float16: finite in float32, Inf once rounded
        (1.0, float("nan"), torch.bfloat16, True),  # a NaN input
    ],
)
def test_every_written_piece_is_finite_in_the_output_dtype(target_value, residual_value, out_dtype, refused):
    """The result is checked as written: by the pieces' norms where they prove it, else element by element."""
    from residuals_core.arithmetic import DictSink, execute, make_apply

    target = StateDictSource({"w": torch.full((64,), target_value)}, label="target")
    residual = StateDictSource({"w": torch.full((64,), residual_value)}, label="residuals")
    plan = plan_tensors(
        [("target", target), ("residuals", residual)],
        out_dtype=lambda info: out_dtype,
        normalize_embeddings=False,
    )
    sink = DictSink(plan)
    run = lambda: execute(plan, make_apply(1.0), sink, reference_operand=0)  # noqa: E731
    if refused:
        with pytest.raises(ResidualsError, match=r"NaN or Inf|overflows"):
            run()
        return
    stats = run()
    written = sink.tensors()["w"]
    assert written.dtype == out_dtype and bool(torch.isfinite(written).all())
    assert torch.equal(written, (torch.full((64,), target_value) + residual_value).to(out_dtype))
    assert stats["w"].numel == 64
