"""The stage pages' config tables are generated from the dataclasses' help strings and must be current."""

import pathlib

import pytest

from peft_post.docgen import _config_classes, render_fields, update_docs

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = {"POSTConfig": "config.md", "PromptTrainingConfig": "tuning.md", "DPConfig": "privacy.md",
         "TransferConfig": "transfer.md", "DistillationConfig": "distillation.md", "PipelineConfig": "pipeline.md",
         "AuditConfig": "audit.md"}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_config_has_a_fields_table_on_its_page(name):
    text = (DOCS / PAGES[name]).read_text()
    assert f"<!-- fields:{name} -->" in text, f"docs/{PAGES[name]} lacks a fields block for {name}"
    cls, base = _config_classes()[name]
    table = render_fields(cls, base)
    assert table in text
    for line in table.splitlines()[2:]:
        assert line.split("|")[3].strip(), f"a field of {name} has no help text: {line}"


def test_docs_are_up_to_date_with_the_dataclasses():
    assert update_docs(str(DOCS), write=False) == [], "run `python -m peft_post.docgen` and commit the docs"
