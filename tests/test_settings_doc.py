"""Every setting is documented in the README, with its current default."""

from pathlib import Path

from common.settings import Settings, settings_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    missing = [f"BIREFNET_{name.upper()}" for name in Settings.model_fields
               if f"`BIREFNET_{name.upper()}`" not in README]
    assert not missing, f"README lacks {missing}; paste `python -m common.settings` into it"


def test_readme_table_is_current():
    stale = [row for row in settings_table().splitlines()[2:] if row not in README]
    assert not stale, f"README rows differ from the settings' defaults/descriptions: {stale[:3]}"
