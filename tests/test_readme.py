"""The README and .env.example tell the truth about the settings model."""

from __future__ import annotations

from pathlib import Path

from toybox_backupd.core.settings import DESCRIPTIONS, Settings, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_generated_from_the_model() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "run: python -m toybox_backupd.core.settings, paste into README"


def test_every_setting_is_described_and_in_env_example() -> None:
    aliases = {field.alias for field in Settings.model_fields.values()}
    assert aliases == set(DESCRIPTIONS)
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    missing = [a for a in sorted(aliases) if f"{a}=" not in text]
    assert not missing, f".env.example lacks {missing}"
