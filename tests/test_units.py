"""residuals_core.units: sizes read as people write them, sizes and durations printed one way."""

import pytest

from residuals_core.errors import ResidualsError
from residuals_core.units import format_duration, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        (" 1.5 gb ", 1_500_000_000),
        ("42", 42),
        (7, 7),
    ],
)
def test_sizes_as_huggingface_hub_reads_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", "inf GB", "nan", 0, -3, True, None, 1.5])
def test_what_is_not_a_size_is_refused_with_an_example(text):
    with pytest.raises(ResidualsError, match=r"5GB|positive"):
        parse_size(text)


def test_sizes_and_durations_print_one_way():
    assert [format_size(n) for n in (512, 38_726, 1_906_872, 206_158_430_208, 3e12)] == [
        "512 B", "38.7 KB", "1.9 MB", "206.16 GB", "3.00 TB",
    ]  # fmt: skip
    assert [format_duration(s) for s in (0.4, 45, 89.5, 90, 959, 7200, 7500)] == [
        "1 s", "45 s", "90 s", "2 min", "16 min", "2 h 00 min", "2 h 05 min",
    ]  # fmt: skip
