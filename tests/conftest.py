"""Shared fixtures: tiny random models of every family and tiny sae-lens packs, built once per run."""

from __future__ import annotations

import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TZ"] = "UTC"  # snapshot tests show local times
time.tzset()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from auditui.testing import FAMILIES, build_tiny_model, build_tiny_pack  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's config, cache or session database."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("AUDITUI_CONFIG", str(home / "config.toml"))
    monkeypatch.setenv("AUDITUI_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("AUDITUI_DB", str(home / "sessions.db"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(family, root / f"tiny-{family}") for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_packs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packs")
    return {family: build_tiny_pack(path, root / f"pack-{family}") for family, path in tiny_models.items()}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def loaded(tiny_models: dict[str, Path]):
    """Loaded tiny models by family (loaded once; tests must leave no hooks behind)."""
    from auditui.engine.model import load_model

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(str(tiny_models[family]), device="cpu", dtype="float32")
        return cache[family]
    return get


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)



@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir for the slow tier: the GGUF is converted once per test run."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: Path):
    from auditui.engine.model import load_model

    return load_model("smollm2", device="cpu", dtype="float32", cache_root=smollm2_cache)
