"""What the family matrix does with one family: merge its tiny fine-tunes, rebuild them, load them back, and
compare every tensor with the one hand-computed from the checkpoint's own files (θ_base + mᵢ∘τ*, MMER arXiv
2505.17110 §3.2), or confirm mmer refuses the family and says why."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from family_builders import (
    BASE_VOCAB,
    MAX_PARAMETERS,
    MODALITIES,
    TEXT,
    FamilyModels,
    build,
    build_base,
    count_parameters,
    families,
    llm_names,
    load,
    loaded_names,
    mismatch,
    write_family,
)
from safetensors import safe_open
from safetensors.torch import save_file

import mmer
from mmer.checkpoint import bits
from mmer.io.layouts import detect_layout

ANSWERS = Path(__file__).with_name("answers.json")
RECORDED_WITH = ANSWERS.with_name("answers_transformers_version.txt")  # the transformers the answers came from


def saved_keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


def recipe(models: FamilyModels) -> mmer.Recipe:
    return mmer.Recipe(
        base=mmer.ModelSpec(str(models.base)),
        models=tuple(mmer.ModelSpec(str(getattr(models, m)), modality=m) for m in MODALITIES),
    )


def expected_llm_tensor(ckpt, modality: str, canonical: str, source: torch.Tensor) -> torch.Tensor:
    """θ_base + mᵢ∘τ* by hand from the checkpoint's base, τ* and packed mask; rows past the base's are the
    source's own (private), as is any tensor the merge left out."""
    slot = next((s for s in ckpt.slots if s.name == canonical), None)
    if slot is None or not slot.merged:
        return source
    base = ckpt.base_tensor(canonical)
    mask = bits.unpack(ckpt.mask_file(modality).packed(canonical), slot.shape)
    shared = (base.float() + mask.float() * ckpt.tau_star(canonical).float()).to(base.dtype)
    if not slot.shape:  # a scalar (Apertus 1.5's per-layer gains) has no rows to add
        return shared
    rows = slot.shape[0]
    return torch.cat([shared, source[rows:]]) if source.shape[0] > rows else shared


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def expected_files(ckpt, modality: str, source_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the source's files as the rebuilt files must hold it: the LLM's θ_base + mᵢ∘τ* by hand,
    everything else the source's own bytes. Compared on disk, where the merge works (transformers 5 fuses some
    families' MoE experts in memory, so in-memory names are not the files' names)."""
    canonical_of = {disk: canonical for canonical, disk in ckpt.modality(modality).llm_keys.items()}
    return {
        key: expected_llm_tensor(ckpt, modality, canonical_of[key], tensor) if key in canonical_of else tensor
        for key, tensor in saved_tensors(source_dir).items()
    }


def write_expected(source_dir: Path, tensors: dict[str, torch.Tensor], into: Path) -> Path:
    """The source's directory with its weights replaced by ``tensors``: what the rebuilt model must load as."""
    into.mkdir()
    for file in source_dir.iterdir():
        if file.is_file() and not file.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(file, into / file.name)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(into / "model.safetensors"), {"format": "pt"})
    return into


def carry_by_hand(source_dir: Path, rebuilt_dir: Path) -> list[str]:
    """Copy the source's files that mmer does not carry (it carries weights, JSON, text and tokenizer files,
    never a pickle such as an omni model's ``spk_dict.pt``) into the rebuilt directory, as a user must; their
    names go into the answer."""
    missing = sorted(f.name for f in source_dir.iterdir() if f.is_file() and not (rebuilt_dir / f.name).exists())
    for name in missing:
        shutil.copyfile(source_dir / name, rebuilt_dir / name)
    return missing


def merge_and_check(family: str, root: Path) -> dict[str, dict[str, int]]:
    """The whole round trip; returns, per modality, how many source tensors went to each bucket."""
    models = write_family(family, root)
    checkpoint = root / "merged"
    mmer.run_merge(recipe(models), checkpoint)
    mmer.reconstruct(checkpoint, root / "rebuilt")
    buckets: dict[str, dict[str, int]] = {}
    with mmer.load_decoupled(checkpoint) as ckpt:
        for modality in MODALITIES:
            source_dir = getattr(models, modality)
            record = ckpt.modality(modality)
            on_disk = saved_keys(source_dir)
            llm, components = set(record.llm_keys.values()), set(record.component_tensors)
            assert not llm & components, f"{family}: tensors in two buckets: {sorted(llm & components)[:3]}"
            assert llm | components == on_disk, (
                f"{family}: not accounted for: {sorted(on_disk - llm - components)[:5]}, "
                f"unknown: {sorted((llm | components) - on_disk)[:5]}"
            )
            source = load(family, source_dir)
            structural = set(llm_names(source).values())
            assert structural, f"{family}: transformers finds no decoder in the model"
            as_loaded = loaded_names(source, on_disk)
            assert {as_loaded[k] for k in llm} == structural, (
                f"{family}: mmer's LLM tensors are not the ones transformers loads into its decoder and head: "
                f"{sorted({as_loaded[k] for k in llm} ^ structural)[:5]}"
            )
            expected = expected_files(ckpt, modality, source_dir)
            rebuilt_files = saved_tensors(root / "rebuilt" / modality)
            assert set(rebuilt_files) == set(expected), f"{family}/{modality}: the rebuilt files hold other tensors"
            for key, tensor in rebuilt_files.items():
                assert torch.equal(tensor, expected[key]), f"{family}/{modality}: {key} differs from the hand-computed"
            uncarried = carry_by_hand(source_dir, root / "rebuilt" / modality)
            rebuilt = load(family, root / "rebuilt" / modality, strict=True)
            want = load(family, write_expected(source_dir, expected, root / f"expected_{modality}"), strict=True)
            want_state = want.state_dict()
            for key, tensor in rebuilt.state_dict().items():
                assert torch.equal(tensor, want_state[key]), f"{family}/{modality}: loaded {key} differs"
            check_logits(want, rebuilt)
            buckets[modality] = {"llm": len(llm), "components": len(components), "uncarried": uncarried}
    return buckets


def check_logits(want, rebuilt) -> None:
    """The rebuilt model's logits on a text-only prompt equal those of the source with its LLM set to the
    hand-computed weights (families whose forward needs image or audio inputs are checked by tensors alone)."""
    ids = torch.arange(1, 9).unsqueeze(0) % BASE_VOCAB
    try:
        with torch.no_grad():
            expected = want(input_ids=ids).logits
    except Exception:  # the family's forward needs more than text; the tensors above already decide
        return
    with torch.no_grad():
        got = rebuilt(input_ids=ids).logits
    assert torch.equal(got, expected)


def _readable_base(model) -> bool:
    """Whether mmer reads ``model`` as a plain causal-LM base (Llama-style names, nothing else)."""
    keys = set(model.state_dict())
    try:
        layout = detect_layout(keys, type(model).__name__)
    except mmer.MmerError:
        return False
    return layout.name == "causal_lm" and all(layout.to_canonical(k) is not None for k in keys)


def refusal(family: str, root: Path) -> mmer.MmerError:
    """Merge one tiny model of ``family`` against the plain causal LM of its text config (a tiny Llama of the
    shared dimensions where transformers has none mmer can read); returns mmer's refusal (fails if none)."""
    base = build_base(family)
    if base is None or not _readable_base(base):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**TEXT, vocab_size=BASE_VOCAB, tie_word_embeddings=False))
    base.save_pretrained(root / "base")
    build(family, 1).save_pretrained(root / "first")
    one = mmer.Recipe(
        base=mmer.ModelSpec(str(root / "base")), models=(mmer.ModelSpec(str(root / "first"), modality="first"),)
    )
    try:
        mmer.run_merge(one, root / "merged")
    except mmer.MmerError as err:
        return err
    raise AssertionError(f"{family}: mmer merged it")


def _said(text: str, root: Path) -> str:
    """A message without the run's temporary paths, so that it reads the same on every machine."""
    text = text.replace(str(root), "<dir>").split(" Fix:")[0]
    text = re.sub(r" \(looked for [^)]*\)", "", text)  # the layouts mmer reads: the same in every refusal
    return re.sub(r"\s+", " ", text).strip()[:420]


# Families whose tiny build does not finish in minutes on two cores: answered without building them.
NOT_BUILT: dict[str, str] = {}


def answer(family: str, root: Path) -> tuple[str, str]:
    """What the matrix says about ``family``: ("works", …), ("refused", mmer's reason), ("skipped", why it
    cannot be built tiny offline), or ("fails", what went wrong in a round trip mmer accepted)."""
    if family in NOT_BUILT:
        return "skipped", NOT_BUILT[family]
    try:
        parameters = count_parameters(family)
        model = build(family, 1) if parameters <= MAX_PARAMETERS else None
        base = build_base(family, model) if model is not None else None
    except Exception as err:  # the family's own code refuses the generic tiny config
        return "skipped", _said(f"no tiny build from its config class: {type(err).__name__}: {err}", root)
    if model is None:
        return "skipped", f"not tiny: {parameters} parameters after shrinking every size field"
    why = "transformers has no causal LM for its text config" if base is None else mismatch(base, model)
    if why is None:
        try:
            buckets = merge_and_check(family, root)
        except mmer.MmerError as err:
            return "refused", _said(f"{type(err).__name__}: {err.message}", root)
        except Exception as err:
            return "fails", _said(f"{type(err).__name__}: {err}", root)
        counts = buckets[MODALITIES[0]]
        said = f"{counts['llm']} LLM tensors merged, {counts['components']} component tensors"
        if counts["uncarried"]:
            said += f"; {', '.join(counts['uncarried'])} not carried by mmer, copied by hand to load"
        return "works", said
    try:
        err = refusal(family, root)
    except Exception as exc:
        return "fails", _said(f"not refused ({why}): {type(exc).__name__}: {exc}", root)
    return "refused", _said(f"{why}; mmer: {type(err).__name__}: {err.message}", root)


README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START, TABLE_END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


def readme_table(answers: dict[str, list[str]]) -> str:
    """The README's family table: one row per family, its answer and the reason (markdown-safe)."""
    rows = ["| family | answer | why |", "|---|---|---|"]
    for family, (said, why) in sorted(answers.items()):
        rows.append(f"| `{family}` | {said} | {why.replace('|', '/').replace('`', '')} |")
    return "\n".join(rows)


def write_readme_table(answers: dict[str, list[str]]) -> None:
    """Replace the table between the README's markers (nothing else in the README is touched)."""
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{readme_table(answers)}\n{TABLE_END}{tail}", encoding="utf-8")


def main(selected: list[str]) -> None:
    """Answer every family (or the named ones) and write them to answers.json, as the matrix test pins them."""
    import tempfile

    answers = json.loads(ANSWERS.read_text()) if ANSWERS.is_file() else {}
    for family in selected or sorted(families()):
        with tempfile.TemporaryDirectory() as tmp:
            answers[family] = list(answer(family, Path(tmp)))
        print(family, *answers[family], sep="\t", flush=True)
        ANSWERS.write_text(json.dumps(dict(sorted(answers.items())), indent=1) + "\n")
    import transformers

    RECORDED_WITH.write_text(transformers.__version__ + "\n")
    if TABLE_START in README.read_text(encoding="utf-8"):
        write_readme_table(answers)


if __name__ == "__main__":
    main(sys.argv[1:])
