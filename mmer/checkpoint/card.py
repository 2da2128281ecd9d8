"""The model card (README.md) of a decoupled checkpoint, with Hub metadata in its YAML front matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmer.checkpoint.manifest import Manifest
from mmer.version import DISTRIBUTION

PROJECT_URL = f"https://pypi.org/project/{DISTRIBUTION}/"


def write_card(directory: Path, manifest: Manifest, report: Any) -> Path:
    """Write README.md: what was merged from what, each modality's mask density, and how to use it."""
    front: dict[str, Any] = {
        "library_name": "mmer",
        "tags": ["mmer", "model-merging", "multimodal", "decoupled-checkpoint", *manifest.modalities],
    }
    if manifest.base.revision is not None or "/" in manifest.base.model and not manifest.base.model.startswith("/"):
        front["base_model"] = manifest.base.model
    single_model = manifest.merged_dir is not None

    def row(name: str, m: Any) -> str:
        lam = "-" if m.lambda_ is None else f"{m.lambda_:g}"
        density = "all of τ*" if single_model else (f"{m.kept / m.total:.2%}" if m.total else "n/a")
        scale = "" if m.scale == 1.0 else f" (scale {m.scale:.4g})"
        return f"| {name} | `{m.source.model}` | {m.source.layout} | {lam} | {density}{scale} |"

    rows = "\n".join(row(name, m) for name, m in manifest.modalities.items())
    options = manifest.options
    dare = f", DARE p = {options['dare']}" if options.get("dare") else ""
    masks = (
        "This is that single merged model θ_base + τ* (mask rule `none`), loadable with transformers' "
        "`from_pretrained` from this directory; each modality's encoder and projector are under `components/`."
        if single_model
        else f"Each modality keeps a 1-bit mask of τ* (mask rule `{options['mask']}`)."
    )
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# MMER decoupled checkpoint

Made by [mmer]({PROJECT_URL}) {manifest.mmer_version} (format {manifest.format_version}) from the
base LLM `{manifest.base.model}` and {len(manifest.modalities)} fine-tuned multimodal models. Their LLM task vectors
were merged with `{options["method"]}` (K = {options["k"]}, α = {options["alpha"]}, trim scope
`{options["trim_scope"]}`{dare}) into one τ*. {masks}

| modality | source model | layout | λ | mask density |
|---|---|---|---|---|
{rows}

Rebuild one modality's LLM (θ_base + mᵢ∘τ*, or θ* for a single merged model):

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
