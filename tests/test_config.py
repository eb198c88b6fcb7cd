"""Settings: the saved-settings file is never clobbered, and the default database has a home when installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from platformdirs import user_data_dir

from auditui.config import (
    REPO_ROOT,
    config_file,
    default_db,
    load_settings,
    save_setting,
)
from auditui.errors import AuditError


def test_save_setting_keeps_the_other_settings():
    config_file().write_text('device = "cpu"\ntheme = "auditui-dark"\n', encoding="utf-8")
    save_setting("theme", 'light "quoted" \\ ü')
    settings = load_settings()
    assert (settings.device, settings.theme) == ("cpu", 'light "quoted" \\ ü')


def test_unparsable_settings_file_is_an_error_and_left_alone():
    path = config_file()
    broken = 'device = "cpu"\ntheme = [unclosed\n'
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(AuditError, match="cannot read settings file"):
        save_setting("theme", "auditui-light")
    assert path.read_text(encoding="utf-8") == broken


def test_unwritable_settings_location_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("AUDITUI_CONFIG", str(tmp_path / "file" / "config.toml"))
    with pytest.raises(AuditError, match="cannot save setting theme"):
        save_setting("theme", "auditui-light")


def test_default_db_is_the_checkout_sessions_folder_or_the_user_data_folder(tmp_path):
    assert default_db(tmp_path) == str(Path(user_data_dir("auditui")) / "auditui.db")
    (tmp_path / "sessions").mkdir()
    assert default_db(tmp_path) == str(tmp_path / "sessions" / "auditui.db")
    assert default_db() == str(REPO_ROOT / "sessions" / "auditui.db")  # this checkout has sessions/
