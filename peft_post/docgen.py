"""Keep the docs' config tables equal to the config dataclasses' own help strings.

Each stage page holds a block between ``<!-- fields:ClassName -->`` and ``<!-- /fields -->``; running
``python -m peft_post.docgen`` rewrites those blocks from the dataclasses, and a test fails when a page is stale.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from .io import atomic_write_text


def _config_classes() -> dict:
    from peft import PromptTuningConfig
    from transformers import TrainingArguments

    from .audit import AuditConfig
    from .config import POSTConfig
    from .distill import DistillationConfig
    from .dp_audit import DPAuditConfig
    from .pipeline import PipelineConfig
    from .transfer import TransferConfig
    from .tuning import DPConfig, PromptTrainingConfig

    return {
        "POSTConfig": (POSTConfig, PromptTuningConfig),
        "PromptTrainingConfig": (PromptTrainingConfig, TrainingArguments),
        "DPConfig": (DPConfig, None),
        "TransferConfig": (TransferConfig, TrainingArguments),
        "DistillationConfig": (DistillationConfig, TrainingArguments),
        "PipelineConfig": (PipelineConfig, None),
        "AuditConfig": (AuditConfig, None),
        "DPAuditConfig": (DPAuditConfig, None),
    }


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    value = getattr(value, "value", value)
    return "`" + repr(value).replace("|", "\\|") + "`"


def render_fields(cls, base=None) -> str:
    """A Markdown table of the fields `cls` declares or overrides (not those it merely inherits from `base`)."""
    own = set(vars(cls).get("__annotations__", {}))
    inherited = {f.name for f in dataclasses.fields(base)} if base is not None else set()
    rows = ["| field | default | help |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in inherited and f.name not in own:
            continue
        help_text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_default(f)} | {help_text} |")
    return "\n".join(rows)


_BLOCK = re.compile(r"(<!-- fields:(\w+) -->\n)(.*?)(<!-- /fields -->)", re.S)


def update_page(text: str) -> str:
    classes = _config_classes()

    def replace(m: re.Match) -> str:
        name = m.group(2)
        if name not in classes:
            raise ValueError(f"Unknown config class {name!r} in a docs fields block; known: {sorted(classes)}.")
        return m.group(1) + render_fields(*classes[name]) + "\n" + m.group(4)

    return _BLOCK.sub(replace, text)


def update_docs(docs_dir: str, write: bool = True) -> list[str]:
    """Rewrite every stale fields block under `docs_dir`; returns the pages that were (or would be) changed."""
    changed = []
    for name in sorted(os.listdir(docs_dir)):
        if not name.endswith(".md"):
            continue
        path = os.path.join(docs_dir, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = update_page(text)
        if new != text:
            changed.append(name)
            if write:
                atomic_write_text(path, new)
    return changed


if __name__ == "__main__":
    docs = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs")
    print("updated:", update_docs(docs) or "nothing")
