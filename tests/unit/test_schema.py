"""The schema builders' patterns accept what users write and refuse the rest."""
from __future__ import annotations

import re

import pytest

from keyroom.api.schema import DURATION_PATTERN, NAME_PATTERN
from keyroom.api.signingkey import CRON_PATTERN


@pytest.mark.parametrize("value", ["36h", "90m", "90d", "1d12h", "1.5h", "30s", "500ms", "7d"])
def test_durations_accepted(value):
    assert re.fullmatch(DURATION_PATTERN, value)


@pytest.mark.parametrize("value", ["", "d", "90", "3 months", "1y", "-1h", "1h-", "P1D", "1.h"])
def test_durations_refused(value):
    assert not re.fullmatch(DURATION_PATTERN, value)


@pytest.mark.parametrize("value", ["0 9 * * 1-5", "*/15 * * * *", "@daily", "30 8 1 * *"])
def test_cron_accepted(value):
    assert re.fullmatch(CRON_PATTERN, value)


@pytest.mark.parametrize("value", ["every monday", "0 9 * *", "@sometimes", "", "$(reboot) * * * *",
                                   "0 9 * * `id`", "0 9 * *\n*", "0 9 * * 1;rm"])
def test_cron_refused(value):
    assert not re.fullmatch(CRON_PATTERN, value)


@pytest.mark.parametrize("value,ok", [("release-key", True), ("a", True), ("Release", False), ("-a", False),
                                      ("a_b", False), ("a.b", True)])
def test_names(value, ok):
    assert bool(re.fullmatch(NAME_PATTERN, value)) is ok
