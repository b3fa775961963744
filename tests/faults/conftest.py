"""Fixtures for the fault suite; the root ``tests/conftest.py`` fixtures (``receiver``, ``base_env``,
``run_cli``, ``make_settings``, ``unused_port``) are visible here too.

Figures a fault test measures (duplicate deliveries, requests during an outage, seeds) are collected with
the ``fault_report`` fixture and printed in a "fault-injection figures" section at the end of the run, so
they show up even with ``-q``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_FIGURES: list[str] = []


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``fault_report("text")``: print now (visible with ``-s``) and in the end-of-run summary."""

    def report(text: str) -> None:
        line = f"{request.node.name}: {text}"
        print(line)
        _FIGURES.append(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
