"""The base of every config section.

Why pydantic v2 rather than dataclasses: we need strict unknown-key rejection
(``extra="forbid"``), coercion of CLI strings into ints/floats/bools/lists, cross-field
checks, and error locations as key paths. Pydantic gives all four, and its error objects
carry the exact ``loc`` we turn into ``train.lr``-style paths with a "did you mean" hint.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Attribute docstrings become field descriptions: `shardtune config show --explain KEY`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
