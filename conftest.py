"""Root pytest configuration: the --benchmark switch.

``pytest benchmarks/ --benchmark`` runs the benchmark suite (parity and speed
against eager PyTorch); without the flag those tests are skipped so that the
normal test run stays fast.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmarks in benchmarks/ (minutes); results go to benchmarks/results/",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks/ --benchmark`")
    for item in items:
        if "benchmark" in item.keywords:
            item.add_marker(skip)
