"""docs/serving.md lists every setting exactly as Settings defines it."""

from __future__ import annotations

import pathlib

from gateway.settings import Settings
from gateway.settings_doc import END, START, replace_table, settings_table

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_the_table_in_docs_matches_settings() -> None:
    document = DOC.read_text()
    assert START in document and END in document
    assert replace_table(document) == document, "run: python -m gateway.settings_doc docs/serving.md"


def test_every_field_has_a_row_and_a_description() -> None:
    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description
        assert f"`SIROCCO_{name.upper()}`" in table
