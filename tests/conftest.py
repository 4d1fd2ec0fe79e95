from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 4-layer LLaMA checkpoint with exits 1..4, shared by the session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", exits=[1, 2, 3, 4])
