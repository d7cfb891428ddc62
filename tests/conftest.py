"""Shared pytest fixtures."""

from __future__ import annotations

from types import ModuleType

import pytest

from tools import mock_cerebras


@pytest.fixture(scope="session")
def mock_cerebras_module() -> ModuleType:
    """The mock upstream (``tools/mock_cerebras.py``)."""
    return mock_cerebras
