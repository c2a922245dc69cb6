"""Fixtures for the backbone tests (helpers and the OpenAI-layout reference CLIP: backbone_helpers.py)."""

import pytest
from backbone_helpers import make_openai_clip, trace_openai_archive


@pytest.fixture(scope="session")
def openai_archive(tmp_path_factory):
    """(path to a fake ``ViT-B-16.pt`` TorchScript archive, the eager model it was traced from)."""
    model = make_openai_clip(seed=1)
    path = tmp_path_factory.mktemp("clip") / "ViT-B-16.pt"
    trace_openai_archive(model, path)
    return path, model
