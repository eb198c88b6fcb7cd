"""Settings: defaults < TOML file < AUDITUI_* environment < explicit flags.

The TOML file lives at `user_config_dir("auditui")/config.toml` (or AUDITUI_CONFIG) and may set
any field of `Settings`, e.g. `device = "cuda"`, `dtype = "bfloat16"`, `theme = "auditui-light"`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from platformdirs import user_cache_dir, user_config_dir

from auditui.errors import AuditError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2"
DEFAULT_PACK = "demo"


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    pack: str = DEFAULT_PACK
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    db: str = str(REPO_ROOT / "sessions" / "auditui.db")
    cache_dir: str = user_cache_dir("auditui")
    theme: str = "auditui-dark"
    judge_base_url: str = ""
    judge_model: str = ""

    def with_overrides(self, **values: object) -> Settings:
        """Apply explicit flags; None means 'not given'."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


def config_file() -> Path:
    return Path(os.environ.get("AUDITUI_CONFIG", Path(user_config_dir("auditui")) / "config.toml"))


def load_settings(**flags: object) -> Settings:
    """Build settings from the TOML file, then AUDITUI_<FIELD> variables, then flags."""
    names = {f.name for f in fields(Settings)}
    values: dict[str, object] = {}
    path = config_file()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise AuditError(f"cannot read settings file {path}: {exc}") from None
        unknown = set(data) - names
        if unknown:
            raise AuditError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        values.update(data)
    for name in names:
        env = os.environ.get(f"AUDITUI_{name.upper()}")
        if env:
            values[name] = env
    return Settings(**{k: str(v) for k, v in values.items()}).with_overrides(**flags)


def save_setting(name: str, value: str) -> None:
    """Persist one setting (e.g. the chosen theme) into the TOML file, keeping the others."""
    path = config_file()
    data: dict[str, object] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            data = {}
    data[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{key} = {_toml_string(str(val))}" for key, val in sorted(data.items())]
    path.write_text("\n".join(lines) + "\n")


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
