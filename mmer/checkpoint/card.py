"""The model card (README.md) of a decoupled checkpoint, with Hub metadata in its YAML front matter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mmer.checkpoint.manifest import Manifest

if TYPE_CHECKING:  # the report type lives in pipeline, which imports this module
    pass


def write_card(directory: Path, manifest: Manifest, report: Any) -> Path:
    """Write README.md: what was merged from what, each modality's mask density, and how to use it."""
    front: dict[str, Any] = {
        "library_name": "mmer",
        "tags": ["mmer", "model-merging", "multimodal", "decoupled-checkpoint", *manifest.modalities],
    }
    if manifest.base.revision is not None or "/" in manifest.base.model and not manifest.base.model.startswith("/"):
        front["base_model"] = manifest.base.model
    rows = "\n".join(
        f"| {name} | `{m.source.model}` | {m.source.layout} | {m.lambda_:g} | {m.kept / m.total:.2%} |"
        if m.total
        else f"| {name} | `{m.source.model}` | {m.source.layout} | {m.lambda_:g} | n/a |"
        for name, m in manifest.modalities.items()
    )
    options = manifest.options
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# MMER decoupled checkpoint

Made by [mmer](https://pypi.org/project/mmer/) {manifest.mmer_version} (format {manifest.format_version}) from the
base LLM `{manifest.base.model}` and {len(manifest.modalities)} fine-tuned multimodal models. Their LLM task vectors
were merged with `{options["method"]}` (K = {options["k"]}, α = {options["alpha"]}, trim scope
`{options["trim_scope"]}`) into one τ*, and each modality keeps a 1-bit mask of τ* (mask rule `{options["mask"]}`).

| modality | source model | layout | λ | mask density |
|---|---|---|---|---|
{rows}

Rebuild one modality's LLM as θ_base + mᵢ∘τ*:

```python
import mmer
ckpt = mmer.load_decoupled("path/to/this/directory")
weight = ckpt.llm_tensor("{next(iter(manifest.modalities))}", "model.layers.0.self_attn.q_proj.weight")
```

`mmer inspect-masks` shows where each modality's mask keeps parameters. The exact options and input revisions are
in `mmer_recipe.yaml`; `mmer merge --recipe mmer_recipe.yaml -o out/` repeats the merge. File layout and hashes:
`mmer_manifest.json` (see FORMAT.md in the mmer package).
"""
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
