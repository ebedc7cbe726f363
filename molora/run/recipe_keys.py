"""``molora train --keys [SECTION]``: every recipe key with its default and type, and for the allocation section
the adapter-field table's help (so a new field is listed and documented by itself)."""
from __future__ import annotations

from typing import Optional

from .recipe import Recipe, RecipeError


def recipe_keys(section: Optional[str] = None) -> str:
    """Every recipe key (of ``section``) as ``section.key = default  [type]  help`` lines: what ``molora train --keys``
    prints. The allocation keys' help comes from the adapter-field table; RecipeError for an unknown section."""
    import typing

    sections = {name: f.annotation for name, f in Recipe.model_fields.items()}
    if section is not None and section not in sections:
        raise RecipeError(f"--keys {section!r}: not a recipe section; sections: {', '.join(sections)}")

    def type_name(ann) -> str:
        text = str(ann).replace("typing.", "")
        return text if not isinstance(ann, type) or typing.get_origin(ann) else ann.__name__

    lines = []
    for name, model in sections.items():
        if section is not None and name != section:
            continue
        lines.append(f"{name}:")
        for key, f in model.model_fields.items():
            default = f.get_default(call_default_factory=True)
            help_ = f"  {f.description}" if f.description else ""
            lines.append(f"  {name}.{key} = {default!r}  [{type_name(f.annotation)}]{help_}")
    return "\n".join(lines)
