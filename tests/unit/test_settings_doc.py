"""Every setting is documented in the configuration reference (docs/configuration.md), with its current
default; `python -m common.settings --docs` regenerates the table there."""

from pathlib import Path

from common.settings import Settings, settings_table, update_docs

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
DOC = PAGE.read_text()


def test_every_setting_is_in_the_reference_table():
    missing = [
        f"BIREFNET_{name.upper()}"
        for name in Settings.model_fields
        if f"`BIREFNET_{name.upper()}`" not in DOC
    ]
    assert not missing, f"docs/configuration.md lacks {missing}; run `python -m common.settings --docs`"


def test_reference_table_is_current():
    stale = [row for row in settings_table().splitlines()[2:] if row not in DOC]
    assert not stale, (
        f"docs/configuration.md rows differ from the settings: {stale[:3]}; run "
        "`python -m common.settings --docs`"
    )


def test_generator_rewrites_only_the_table(tmp_path):
    """The generator replaces what lies between the markers and keeps the page's prose around them."""
    page = tmp_path / "configuration.md"
    page.write_text(
        "# Configuration\n\nintro\n\n<!-- settings:start -->\n| stale |\n<!-- settings:end -->\n\nafter\n"
    )
    update_docs(str(page))
    text = page.read_text()
    assert text.startswith("# Configuration\n\nintro\n\n<!-- settings:start -->\n" + settings_table() + "\n")
    assert text.endswith("\n<!-- settings:end -->\n\nafter\n") and "| stale |" not in text
