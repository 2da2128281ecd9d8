"""The model card (README.md) of an mmer output, with the Hub's metadata in its YAML front matter.

The front matter is what the Hugging Face Hub indexes (its model-card specification): ``base_model`` lists every
model merged, the base and each fine-tune, with ``base_model_relation: merge``, so the Hub's model tree shows
where the merge came from; ``license`` is the sources' licence when they agree (:mod:`mmer.checkpoint.licences`);
``pipeline_tag`` follows from what the modalities take in. The body says how to use the output in commands one can
paste, and inlines the recipe that repeats it. A ``--mask none`` output is one plain transformers model, so its
card is a transformers card (``library_name: transformers``); only a checkpoint with masks is a decoupled one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mmer.checkpoint.decoupled import CARD_NAME
from mmer.checkpoint.licences import SourceLicence, agreed, licence_files, source_licence
from mmer.checkpoint.manifest import Manifest, SourceRecord
from mmer.errors import MmerError
from mmer.io.jsonfile import read_json_file
from mmer.io.resolve import is_hub_id
from mmer.version import DISTRIBUTION

PROJECT_URL = f"https://pypi.org/project/{DISTRIBUTION}/"
RELATION = "merge"
DECOUPLED_TAG = "decoupled-checkpoint"
HERE = "."
# What a modality takes in, by the start of its name (the modality names the README suggests), else by the source
# config's model_type; several different ones make the output any-to-any.
TASK_BY_NAME = (
    ("vision", "image-text-to-text"),
    ("image", "image-text-to-text"),
    ("ocr", "image-text-to-text"),
    ("video", "video-text-to-text"),
    ("audio", "audio-text-to-text"),
    ("speech", "audio-text-to-text"),
)
TASK_BY_MODEL_TYPE = (("audio", "audio-text-to-text"), ("video", "video-text-to-text"), ("vl", "image-text-to-text"))


def write_card(directory: Path, manifest: Manifest, report: Any, recipe_yaml: str = "") -> Path:
    """Write README.md into ``directory`` (the staged output, its other files already written).

    A licence that cannot be settled is a warning on ``report``. The usage lines name the checkpoint as ``.``
    (run in its directory): the same inputs give the same card wherever the output is written, and the Hub id it
    gets once uploaded is not known here.
    """
    ref = HERE
    licences = _licences(directory, manifest)
    licence, licence_name, warning = agreed(licences)
    if warning is not None and hasattr(report, "warnings"):
        report.warnings.append(warning)
    single = manifest.merged_dir is not None
    front: dict[str, Any] = {
        "library_name": "transformers" if single else "mmer",
        "license": licence,
        **({"license_name": licence_name} if licence_name else {}),
        "base_model": list(dict.fromkeys(hub_name(r.model) for r in _records(manifest))),
        "base_model_relation": RELATION,
        "pipeline_tag": _pipeline_tag(directory, manifest, single),
        "tags": ["merge", "mmer", "model-merging", *([] if single else [DECOUPLED_TAG, *manifest.modalities])],
    }
    if front["pipeline_tag"] is None:
        del front["pipeline_tag"]
    body = _single_body(directory, manifest, ref) if single else _decoupled_body(manifest, ref)
    text = (
        f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}\n---\n\n{body}"
        f"{_sources_section(manifest, licences, licence)}{_recipe_section(recipe_yaml, ref)}"
    )
    path = directory / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path


def hub_name(model: str) -> str:
    """How ``base_model`` names a source: its Hub id, a Hub cache snapshot's id, else the directory's name."""
    if is_hub_id(model) and not os.path.isabs(model):
        return model
    parts = Path(model).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and parts[i - 1].count("--") >= 2:
            return parts[i - 1].removeprefix("models--").replace("--", "/", 1)
    return Path(model).name or model


# --------------------------------------------------------------------------------------------------- bodies
def _decoupled_body(manifest: Manifest, ref: str) -> str:
    options = manifest.options
    how = _merge_options(options, manifest)
    first = next(iter(manifest.modalities))
    rows = "\n".join(
        f"| {name} | `{m.source.model}` | {m.source.layout} | {'-' if m.lambda_ is None else f'{m.lambda_:g}'} | "
        f"{f'{m.kept / m.total:.2%}' if m.total else 'n/a'}{'' if m.scale == 1.0 else f' (scale {m.scale:.4g})'} |"
        for name, m in manifest.modalities.items()
    )
    return f"""# MMER decoupled checkpoint

An MMER decoupled checkpoint (arXiv 2505.17110), made by [mmer]({PROJECT_URL}) {manifest.mmer_version} (format
{manifest.format_version}) from the base LLM `{manifest.base.model}` and {len(manifest.modalities)} fine-tuned
multimodal models. Their LLM task vectors were merged with `{options["method"]}` ({how}) into one
τ*; each modality keeps a 1-bit mask of it (mask rule `{options["mask"]}`) and its own encoder and projector, and
comes back as θ_base + mᵢ∘τ*.{_storage_note(manifest)}

| modality | source model | layout | λ | mask density |
|---|---|---|---|---|
{rows}

## Use it

```bash
pip install {DISTRIBUTION}
mmer reconstruct {ref} --modality {first} -o ../{first}-model/   # the source's layout, loadable with transformers
```

```python
from mmer import Router

router = Router.from_pretrained("{ref}", device="cuda")   # θ_base, τ* and the masks loaded once
out = router.generate(**inputs, modality="{first}")          # switch modality per call
```

Run these in this directory, or name it by its path instead of `{ref}`, or by its Hub id once it is on the
Hugging Face Hub (`org/name`; `--revision` / `revision=` pins a commit; only the files needed are fetched).
`mmer inspect-masks {ref}` shows where each mask keeps τ*; `mmer verify {ref}` checks every file against the
sha256 in `mmer_manifest.json` (layout: FORMAT.md in the mmer package).
"""


def _single_body(directory: Path, manifest: Manifest, ref: str) -> str:
    options = manifest.options
    how = _merge_options(options, manifest)
    names = ", ".join(f"`{m.source.model}`" for m in manifest.modalities.values())
    architecture = _architecture(directory)
    first = next(iter(manifest.modalities))
    return f"""# Merged model

A merge of the base LLM `{manifest.base.model}` and its fine-tunes {names}: their LLM task vectors merged with
`{options["method"]}` ({how}) into one model θ_base + τ*, made with [mmer]({PROJECT_URL})
{manifest.mmer_version}. It is a plain transformers checkpoint{f" (`{architecture}`)" if architecture else ""}:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{ref}")
tokenizer = AutoTokenizer.from_pretrained("{ref}")
```

Each fine-tune's own encoder and projector are kept under `components/<modality>/`; `mmer reconstruct {ref}
--modality {first} -o ../{first}-model/` (`pip install {DISTRIBUTION}`; run in this directory) puts one back
around the merged LLM, as a model of the fine-tune's own class.
"""


def _storage_note(manifest: Manifest) -> str:
    """A quantised τ* is said where the method is: a reader of the card should know its τ* is not exact."""
    encoding = manifest.tau_star_encoding
    if encoding is None:
        return ""  # the exact card, word for word as before the option
    return (
        f" τ* is stored as {encoding.scheme} codes with one float32 scale per {encoding.group_size} entries "
        "(the masks were made from the exact τ*; FORMAT.md, Quantised τ*)."
    )


def _merge_options(options: dict[str, Any], manifest: Manifest) -> str:
    """K, α, the trim's scope and DARE's p, with each model's own K and p where its recipe gave one."""

    def own(key: str) -> str:
        records = manifest.modalities.items()
        given = [f"{name} {getattr(m, key):g}" for name, m in records if getattr(m, key) is not None]
        return f" (per model: {', '.join(given)})" if given else ""

    dare = f", DARE p = {options['dare']}{own('dare')}" if options.get("dare") or own("dare") else ""
    return f"K = {options['k']}{own('k')}, α = {options['alpha']}, trim scope `{options['trim_scope']}`{dare}"


def _sources_section(manifest: Manifest, licences: list[SourceLicence], licence: str) -> str:
    def row(s: SourceLicence) -> str:
        said = "not found" if s.licence is None else s.licence if s.licence != "other" else f"other ({s.name})"
        where = f" ({s.read_from})" if s.read_from else ""
        files = ", ".join(f"`{f}`" for f in s.files) or "-"
        return f"| {s.label} | `{s.model}` | {said}{where} | {files} |"

    if licence != "other":
        note = f"Every merged model is under `{licence}`, so the front matter declares `{licence}` for the merge."
    else:
        note = (
            "The merged models' licences are not all known, or differ, so the front matter says `license: other`. "
            "A merge is bound by the terms of every model in it: read each one's before publishing this."
        )
    return f"""
## Merged models and licences

| role | model | licence (read from) | licence files in this output |
|---|---|---|---|
{chr(10).join(row(s) for s in licences)}

{note}
"""


def _recipe_section(recipe_yaml: str, ref: str) -> str:
    if not recipe_yaml:
        return ""
    return f"""
## Recipe

`mmer merge mmer_recipe.yaml -o ../again/`, run in this directory, repeats this merge exactly (Hub revisions
are pinned to the commits used). It is also here:

```yaml
{recipe_yaml.rstrip()}
```
"""


# ---------------------------------------------------------------------------------------------- metadata
def _records(manifest: Manifest) -> list[SourceRecord]:
    return [manifest.base, *(m.source for m in manifest.modalities.values())]


def _licences(directory: Path, manifest: Manifest) -> list[SourceLicence]:
    """Each merged model's licence: read from the model where it still is, else from the copy in the output."""
    stored_base = [directory / manifest.base_dir] if manifest.base_dir else []
    if manifest.merged_dir is not None:
        stored_base = [directory]
    found = [source_licence("base", manifest.base, [*_at_hand(manifest.base), *stored_base])]
    prefix = "" if manifest.merged_dir is not None else f"{manifest.base_dir}/"
    found[0].files = [prefix + f for d in stored_base for f in licence_files(d)]
    for name, m in manifest.modalities.items():
        component = directory / m.component_dir
        record = source_licence(name, m.source, [*_at_hand(m.source), component])
        record.files = [f"{m.component_dir}/{f}" for f in licence_files(component)]
        found.append(record)
    return found


def _at_hand(record: SourceRecord) -> list[Path]:
    """Where the source's own files are on this machine, if anywhere: its directory, or its Hub cache snapshot."""
    if os.path.isabs(record.model):
        return [Path(record.model)] if os.path.isdir(record.model) else []
    if not (record.commit and is_hub_id(record.model)):
        return []
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / ("models--" + record.model.replace("/", "--")) / "snapshots"
    snapshot = snapshot / record.commit
    return [snapshot] if snapshot.is_dir() else []


def _pipeline_tag(directory: Path, manifest: Manifest, single: bool) -> str | None:
    if single:  # the root model is the base LLM's architecture: text in, text out
        return "text-generation"
    tasks = {_task(name, m.source.config) for name, m in manifest.modalities.items()} - {None}
    if not tasks:
        return None
    return tasks.pop() if len(tasks) == 1 else "any-to-any"


def _task(modality: str, model_type: str | None) -> str | None:
    lowered = modality.lower()
    for prefix, task in TASK_BY_NAME:
        if lowered.startswith(prefix):
            return task
    for part, task in TASK_BY_MODEL_TYPE:
        if model_type and part in model_type.lower():
            return task
    if model_type and model_type.lower() in ("llava", "llava_next", "idefics2", "idefics3", "paligemma", "mllama"):
        return "image-text-to-text"
    return None


def _architecture(directory: Path) -> str | None:
    """The transformers class the root config names (mmer copied it from the base; read back, not trusted)."""
    try:
        data = read_json_file(directory / "config.json", what="config")
    except MmerError:
        return None
    names = data.get("architectures") if isinstance(data, dict) else None
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
