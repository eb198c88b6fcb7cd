"""Settings: defaults < TOML file < AUDITUI_* environment < explicit flags.

The TOML file lives at `user_config_dir("auditui")/config.toml` (or AUDITUI_CONFIG) and may set
any field of `Settings`, e.g. `device = "cuda"`, `dtype = "bfloat16"`, `theme = "auditui-light"`.
Session databases go to the checkout's `sessions/` folder, or (installed, no such folder)
`user_data_dir("auditui")`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from platformdirs import user_cache_dir, user_config_dir, user_data_dir

from auditui.errors import AuditError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2"
DEFAULT_PACK = "demo"


def default_db(root: Path = REPO_ROOT) -> str:
    """`root/sessions/auditui.db` in a checkout; the user data folder when installed (no sessions/)."""
    sessions = root / "sessions"
    folder = sessions if sessions.is_dir() else Path(user_data_dir("auditui"))
    return str(folder / "auditui.db")


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    pack: str = DEFAULT_PACK
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    db: str = field(default_factory=default_db)
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
        data = read_settings_file(path)
        unknown = set(data) - names
        if unknown:
            raise AuditError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        values.update(data)
    for name in names:
        env = os.environ.get(f"AUDITUI_{name.upper()}")
        if env:
            values[name] = env
    return Settings(**{k: str(v) for k, v in values.items()}).with_overrides(**flags)


def read_settings_file(path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read settings file {path}: {exc}") from None


def save_setting(name: str, value: str) -> None:
    """Persist one setting (e.g. the chosen theme) into the TOML file, keeping the others.

    A file that cannot be read or parsed is left as it is (AuditError), never overwritten.
    """
    path = config_file()
    data = read_settings_file(path) if path.exists() else {}
    data[name] = value
    lines = [f"{key} = {_toml_string(str(val))}" for key, val in sorted(data.items())]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise AuditError(f"cannot save setting {name} to {path}: {exc}") from None


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
