from __future__ import annotations

from datetime import timedelta

import pytest

from mvm.durations import format_duration, parse_duration
from mvm.errors import InvalidArgument


@pytest.mark.parametrize(("value", "seconds"), [
    ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("2w", 1209600), ("1h30m", 5400),
    (" 10M ", 600), ("300", 300), (300, 300), (1.2, 2), (timedelta(hours=1), 3600),
])
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "10x", "-5m", "1.5h", "h", 0, -1, "0s", None, True, [], "9999999d",
                                   float("nan")])
def test_bad_durations_name_the_field(value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_duration(value, "ttl")
    assert info.value.field == "ttl"
    assert "24h" in str(info.value.allowed)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 125, 3700, 90000, -300)] == ["5s", "2m5s", "1h1m", "1d1h", "-5m"]
