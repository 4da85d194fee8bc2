"""pytest-benchmark setup for the kernel microbenchmarks (run: pytest benchmarks/ --import-mode=importlib).

Not part of the test run (tests live in tests/). The case lists, operands and providers come from
run_kernels.py, the one-command runner, so both measure the same thing.
"""

import os
import sys

import pytest

# run_kernels.py sits beside this file and is not an installed module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        skip = pytest.mark.skip(reason="TRITON_INTERPRET is set: benchmarks time real kernels")
        for item in items:
            item.add_marker(skip)
