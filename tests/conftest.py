"""Shared fixtures. Tests that need ../shared (reference checkpoints, official tokenizers) skip with a reason
when it is absent; CI always has it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's command runs two pytest workers on the 2 CI cores: one thread each (and in the processes they
    # start), else 2 x 2 OpenMP threads spin against each other and the suite runs slower than serially
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch as _torch
    _torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLMKIT_SHARED", ROOT.parent / "shared"))
GLM = SHARED / "glm"
REF = GLM / "reference-tiny"
OFFICIAL = GLM / "official"
GENERATIONS = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}

needs_shared = pytest.mark.skipif(not REF.is_dir(), reason=f"{SHARED} (reference checkpoints) is absent")


def _kernels_ok() -> bool:
    try:
        from glmkit import kernels
        return kernels.available()
    except (ImportError, AttributeError):
        return False


needs_kernels = pytest.mark.skipif(not _kernels_ok(), reason="glmkit.kernels (AVX2 C extension) not built or no "
                                                              "AVX2 on this CPU: only the reference path runs")


def expected():
    return json.loads((REF / "expected.json").read_text())


def ref_cases():
    """(generation, index, case) for every prompt in expected.json; empty when ../shared is absent."""
    if not REF.is_dir():
        return []
    return [(g, i, c) for g, cases in expected().items() for i, c in enumerate(cases)]


_PIPES: dict = {}


def ref_pipeline(gen: str, dtype: str = "float32"):
    """Loaded once per test session (tiny models, but the vocabularies are real)."""
    import glmkit

    key = (gen, dtype)
    if key not in _PIPES:
        _PIPES[key] = glmkit.load(REF / gen, dtype=dtype)
    return _PIPES[key]


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path / "model"
