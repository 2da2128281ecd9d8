"""Fuzzing every file mmer parses: a mutated header, index, config, manifest, mask or recipe ends in a clean
MmerError or a correct result, never in another exception, a hang, or a write outside the work directory.

Each family mutates copies of one file of a tiny checkpoint built once per module, blindly (truncate, flip,
insert, delete bytes) and by structure (re-type, tweak, drop, add, rename or duplicate JSON fields), then calls
what mmer calls on that file and judges the outcome with an oracle that says what a correct result is. Cases
are seeded: a failure prints the seed and mutations that replay it (``MMER_FUZZ_ONLY=family/style:index``);
``MMER_FUZZ_CASES`` and ``MMER_FUZZ_SEED`` run more or other cases locally.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from fuzz_harness import Case, Failure, FuzzRun, case_indices, case_seed, memory_bound, tree_state
from fuzz_mutators import (
    Mutation,
    Raw,
    dumps,
    hostile_paths,
    hostile_values,
    mutate_bytes,
    mutate_json,
    nested,
    nodes,
    schema_path,
)
from fuzz_mutators import put as put_node
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.decoupled import DecoupledCheckpoint, MaskFile
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME
from mmer.config import MergeOptions, ModelSpec, Recipe, load_recipe, load_spec
from mmer.errors import MmerError
from mmer.io.reader import SAFETENSORS_DTYPES, CheckpointReader, read_safetensors_header
from mmer.verify import VerifyReport, verify

MODALITY_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")  # FORMAT.md's rule, restated: the oracle is independent
SAMPLE_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight")


# ------------------------------------------------------------------------------------------------- the arena


@dataclass
class Arena:
    """A work directory holding every target file, and a sentinel beside it that no case may change or read."""

    root: Path
    work: Path
    sentinel: Path
    sources: Path  # the session's tiny models: read by some cases, written by none
    headers: Path
    index: Path
    config_base: Path
    config_vision: Path
    checkpoint: Path
    recipe: Path
    spec: Path
    rebuilt: dict[str, torch.Tensor]  # SAMPLE_TENSORS of "vision", as merged
    reconstructed: dict[str, torch.Tensor]  # the LLM tensors of "vision" as reconstruct writes them, by disk key
    plan_slots: list[tuple]
    originals: dict[Path, bytes]  # every file of the work directory as built: each test starts from these

    def original(self, path: Path) -> bytes:
        return self.originals[path]

    def restore(self) -> None:
        for path, data in self.originals.items():
            if not path.is_file() or path.read_bytes() != data:
                put(path, data)

    def run(self, family: str) -> FuzzRun:
        return FuzzRun(family, self.work, self.sentinel)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _slots(plan) -> list[tuple]:
    return [(s.name, tuple(s.shape), s.dtype, s.merged) for s in plan.slots]


@pytest.fixture(scope="module")
def arena(tiny_models, tmp_path_factory) -> Arena:
    from conftest import write_model

    root = tmp_path_factory.mktemp("fuzz")
    work, sentinel = root / "work", root / "sentinel"
    _copy(tiny_models["base_dir"], sentinel)  # a valid model: a path that escapes to it would load
    (sentinel / "secret.txt").write_text("what no checkpoint may contain\n")
    src_base = _copy(tiny_models["base_dir"], work / "src" / "base")
    src_vision = _copy(tiny_models["vision_dir"], work / "src" / "vision")
    checkpoint = work / "ck"
    mmer.run_merge(recipe_for(src_base, {"vision": src_vision}), checkpoint)
    with mmer.load_decoupled(checkpoint) as ckpt:
        rebuilt = {name: ckpt.llm_tensor("vision", name) for name in SAMPLE_TENSORS}
        llm_keys = set(ckpt.modality("vision").llm_keys.values())
    report = mmer.reconstruct(checkpoint, root / "baseline")
    with CheckpointReader(report.models[0].path) as reader:
        reconstructed = {k: reader.get(k) for k in reader.tensors if k in llm_keys}
    config_base = _copy(src_base, work / "config" / "base")
    config_vision = _copy(src_vision, work / "config" / "vision")
    recipe = work / "yaml" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": {"model": str(src_base)},
                "models": [{"model": str(src_vision), "modality": "vision", "lambda": 0.9, "weight": 1.0}],
                "options": {
                    "method": "ties",
                    "mask": "mmer",
                    "k": 0.8,
                    "alpha": None,
                    "lambda": 0.9,
                    "trim_scope": "global",
                    "dare": 0.0,
                    "dare_seed": 0,
                    "shard_size": "5GB",
                    "hash_inputs": False,
                },
            },
            sort_keys=False,
        )
    )
    spec = work / "yaml" / "vision.yaml"
    spec.write_text(
        yaml.safe_dump({"model": str(src_vision), "revision": "main", "modality": "vision", "lambda": 0.5})
    )
    headers = _copy(src_base, work / "headers")
    index = write_model(work / "index", tiny_models["base"], shards=2)
    plan_slots = _slots(mmer.build_plan(recipe_for(config_base, {"vision": config_vision})))
    originals = {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    return Arena(
        root=root,
        work=work,
        sentinel=sentinel,
        sources=tiny_models["root"],
        headers=headers,
        index=index,
        config_base=config_base,
        config_vision=config_vision,
        checkpoint=checkpoint,
        recipe=recipe,
        spec=spec,
        rebuilt=rebuilt,
        reconstructed=reconstructed,
        plan_slots=plan_slots,
        originals=originals,
    )


@pytest.fixture
def fuzz(arena, monkeypatch, tmp_path_factory):
    """Start a family with the work directory as cwd; its ``finish`` also checks that nothing outside changed."""
    monkeypatch.chdir(arena.work)
    basetemp = tmp_path_factory.getbasetemp()
    before = (tree_state(arena.sentinel), sorted(os.listdir(arena.root)), tree_state(arena.sources))
    before_tmp = sorted(os.listdir(basetemp))

    def outside_unchanged(run: FuzzRun) -> None:
        after = (tree_state(arena.sentinel), sorted(os.listdir(arena.root)), tree_state(arena.sources))
        places = ("the sentinel", "the arena's root", "the source models")
        for what, old, new in zip(places, before, after, strict=True):
            if old != new:
                run.failures.append(_outside_failure(run, f"{what} changed: {_diff(old, new)}"))
        if sorted(os.listdir(basetemp)) != before_tmp:
            run.failures.append(_outside_failure(run, "new entries in the pytest base temp directory"))

    def start(family: str) -> FuzzRun:
        run = arena.run(family)
        run.after.append(outside_unchanged)
        return run

    try:
        with memory_bound():
            yield start
    finally:
        arena.restore()


def _outside_failure(run: FuzzRun, message: str):
    seed = case_seed(run.family, -1)
    return Failure(run.family, "wrote outside", "tree changed", "(any case)", message, seed, -1, [])


def _diff(old, new) -> str:
    if isinstance(old, dict):
        changed = sorted(set(old) ^ set(new) | {k for k in set(old) & set(new) if old[k] != new[k]})
        return ", ".join(changed[:5])
    return f"{sorted(set(old) ^ set(new))[:5]}"


def put(path: Path, data: bytes) -> None:
    """Replace ``path`` by a new file (a new inode: a map of the old one, still open somewhere, stays valid)."""
    tmp = path.with_name(path.name + ".fuzz-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rng_for(family: str, index: int) -> random.Random:
    return random.Random(case_seed(family, index))


def safetensors_parts(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n], data[8 + n :]


def mutate_safetensors(rng: random.Random, data: bytes, style: str, paths: list[str], focus=None) -> Mutation:
    """Blind edits land mostly in the header; structural ones edit the header's JSON and re-frame it."""
    header, body = safetensors_parts(data)
    if style == "bytes":
        return mutate_bytes(rng, data, hot=(0, 8 + len(header)))
    mutation = mutate_json(rng, header, paths, focus=focus, embedded=True)
    new = mutation.data + b" " * (-len(mutation.data) % 8)
    length = len(new)
    if rng.random() < 0.1:
        length = rng.choice((length + rng.randint(1, 16), max(length - rng.randint(1, 16), 0), 2**63, 0))
        mutation.ops.append(f"header length prefix set to {length} (really {len(new)})")
    mutation.data = struct.pack("<Q", length) + new + body
    return mutation


# ------------------------------------------------------------------------------------------ safetensors headers


def header_claims_hold(case: Case, infos, metadata, size: int) -> None:
    what = "read_safetensors_header"
    case.require(
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()),
        "an accepted header's __metadata__ is a str -> str mapping",
        what,
        f"__metadata__ came back as {type(metadata).__name__}: {str(metadata)[:80]}",
    )
    for name, info in infos.items():
        begin, end = info.byte_range
        case.require(
            info.dtype in SAFETENSORS_DTYPES.values()
            and all(isinstance(d, int) and d >= 0 for d in info.shape)
            and 8 <= begin <= end <= size
            and end - begin == math.prod(info.shape) * info.dtype.itemsize,
            "an accepted tensor entry has a known dtype, a shape and a byte range inside the file that fit",
            what,
            f"{name}: {info}",
        )


def read_back(case: Case, directory: Path) -> None:
    """Open ``directory`` as a model and read every tensor: each has the shape and dtype its header claims."""
    reader = case.call("CheckpointReader", CheckpointReader, directory)
    if not isinstance(reader, CheckpointReader):
        return
    for name, info in reader.tensors.items():
        tensor = case.call("CheckpointReader.get", reader.get, name)
        if isinstance(tensor, torch.Tensor):
            case.require(
                tuple(tensor.shape) == info.shape and tensor.dtype == info.dtype,
                "a tensor read from an accepted header has the shape and dtype the header claims",
                "CheckpointReader.get",
                f"{name}: header says {info.shape} {info.dtype}, read {tuple(tensor.shape)} {tensor.dtype}",
            )
    reader.close()


@pytest.mark.parametrize("style", ["bytes", "structure"])
def test_a_mutated_safetensors_header_is_read_as_it_claims_or_refused(arena, fuzz, style):
    family = f"headers/{style}"
    run = fuzz(family)
    target = arena.headers / "model.safetensors"
    original = arena.original(target)
    paths = hostile_paths(arena.headers, arena.sentinel)
    for i in case_indices(family):
        mutation = mutate_safetensors(rng_for(family, i), original, style, paths)
        put(target, mutation.data)
        case = run.case(i, mutation.ops)
        got = case.call("read_safetensors_header", read_safetensors_header, target)
        if isinstance(got, tuple):
            header_claims_hold(case, *got, size=len(mutation.data))
        read_back(case, arena.headers)
    put(target, original)
    run.finish()


# ------------------------------------------------------------------------------------------------ shard index


@pytest.mark.parametrize("style", ["bytes", "structure"])
def test_a_mutated_shard_index_is_followed_inside_the_model_or_refused(arena, fuzz, style):
    family = f"index/{style}"
    run = fuzz(family)
    target = arena.index / "model.safetensors.index.json"
    original = arena.original(target)
    paths = hostile_paths(arena.index, arena.sentinel)
    inside = os.path.realpath(arena.index) + os.sep
    for i in case_indices(family):
        rng = rng_for(family, i)
        mutation = mutate_bytes(rng, original) if style == "bytes" else mutate_json(rng, original, paths)
        put(target, mutation.data)
        case = run.case(i, mutation.ops)
        reader = case.call("CheckpointReader", CheckpointReader, arena.index)
        if isinstance(reader, CheckpointReader):
            outside = [str(f) for f in reader.files if not os.path.realpath(f).startswith(inside)]
            oracle = "every shard an accepted index names is inside the model"
            case.require(not outside, oracle, "CheckpointReader", f"{outside}")
            reader.close()
            read_back(case, arena.index)
    put(target, original)
    run.finish()


# --------------------------------------------------------------------------------------------- model configs

STRUCTURAL = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def semantic_config_edit(rng: random.Random, config: dict) -> tuple[list[str], str, str | None]:
    """An edit a loose check lets through: an architecture number changed, or the text config hidden under a
    key mmer does not know with another ``rms_norm_eps``. Returns the ops, the demand they make, and the key a
    warning may name instead of a refusal (None: only a refusal will do)."""
    text = config["text_config"]
    if rng.random() < 0.5:
        key = rng.choice(STRUCTURAL)
        text[key] = text[key] + rng.choice((1, 2, text[key]))
        ops = [f"text_config.{key} -> {text[key]}"]
        return ops, f"a model whose config {key} differs from the base's is refused", None
    hidden = rng.choice(("thinker_config", "llm_cfg", "language_model_config", "decoder"))
    key, value = rng.choice((("rms_norm_eps", 1e-6), ("rope_theta", 500000.0)))
    text[key] = value
    config[hidden] = config.pop("text_config")
    ops = [f"text_config renamed {hidden}", f"{hidden}.{key} -> {value}"]
    return ops, f"a text config under an unknown key with another {key} is refused or warned about", key


@pytest.mark.parametrize("style", ["bytes", "structure", "semantic"])
def test_a_mutated_model_config_plans_correctly_or_is_refused(arena, fuzz, style):
    family = f"config/{style}"
    run = fuzz(family)
    originals = {d: arena.original(d / "config.json") for d in (arena.config_base, arena.config_vision)}
    recipe = recipe_for(arena.config_base, {"vision": arena.config_vision})
    for i in case_indices(family):
        rng = rng_for(family, i)
        directory = arena.config_vision if style == "semantic" or rng.random() < 0.7 else arena.config_base
        demand = warn_key = None
        if style == "bytes":
            mutation = mutate_bytes(rng, originals[directory])
        elif style == "structure":
            mutation = mutate_json(rng, originals[directory], hostile_paths(directory, arena.sentinel))
        else:
            config = json.loads(originals[directory])
            ops, demand, warn_key = semantic_config_edit(rng, config)
            mutation = Mutation(json.dumps(config).encode(), ops)
        put(directory / "config.json", mutation.data)
        case = run.case(i, [f"{directory.name}/config.json: {op}" for op in mutation.ops])
        plan = case.call("build_plan", mmer.build_plan, recipe)
        if plan is not None and not isinstance(plan, MmerError):
            case.require(_slots(plan) == arena.plan_slots, "a config edit never changes the tensor plan", "build_plan")
            if demand is not None:
                warned = warn_key is not None and any(warn_key in w for w in plan.warnings)
                case.require(warned, demand, "build_plan", f"planned without a word; warnings: {plan.warnings}")
        put(directory / "config.json", originals[directory])
    run.finish()


# -------------------------------------------------------------------------------------- decoupled checkpoints


def _strict_json(data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _escapes(rel) -> bool:
    if not isinstance(rel, str):
        return False
    parts = rel.replace("\\", "/").split("/")
    return rel.startswith("/") or ".." in parts or "\\" in rel or ":" in rel


def manifest_demands(data: bytes, original: bytes, sidecar_recomputed: bool) -> tuple[str | None, str | None]:
    """What a correct reader must do with these manifest bytes: (why load must refuse, why verify must fail)."""
    if data == original:
        return None, None
    if not sidecar_recomputed:
        why = "a manifest that no longer matches its .sha256 sidecar is refused"
        return why, why
    parsed = _strict_json(data)
    if not isinstance(parsed, dict):
        why = "a manifest that is not a JSON object is refused"
        return why, why
    modalities = parsed.get("modalities")
    if isinstance(modalities, dict):
        bad = [m for m in modalities if not MODALITY_NAME.fullmatch(m)]
        if bad:
            why = f"a modality name outside {MODALITY_NAME.pattern} is refused ({bad[0][:40]!r})"
            return why, why
    paths = list(parsed.get("files", {}) if isinstance(parsed.get("files"), dict) else [])
    paths += [parsed.get(k) for k in ("base_dir", "tau_star_dir", "merged_dir")]
    for record in modalities.values() if isinstance(modalities, dict) else []:
        if isinstance(record, dict):
            paths += [record.get("mask_file"), record.get("component_dir")]
    escaping = [p for p in paths if _escapes(p)]
    if escaping:
        why = f"a manifest path that leaves the checkpoint is refused ({escaping[0][:40]!r})"
        return why, why
    if parsed.get("files") != json.loads(original)["files"]:
        return None, "verify reports a manifest whose `files` no longer describe the checkpoint"
    return None, None


def rebuild_sample(case: Case, arena: Arena, ckpt: DecoupledCheckpoint, exact: bool = False) -> None:
    """Rebuild the sample tensors of every modality (at most two): each has the shape and dtype merged (and,
    with ``exact``, the very values: for edits a reader can see without hashing, a different tensor is wrong)."""
    slots = {s.name for s in ckpt.slots}
    for modality in list(ckpt.modalities)[:2]:
        for name in SAMPLE_TENSORS:
            if name not in slots:
                continue
            tensor = case.call("llm_tensor", ckpt.llm_tensor, modality, name)
            if isinstance(tensor, torch.Tensor):
                merged = arena.rebuilt[name]
                case.require(
                    (tensor.shape, tensor.dtype) == (merged.shape, merged.dtype),
                    "a tensor rebuilt from an accepted checkpoint has the shape and dtype it was merged with",
                    "llm_tensor",
                    f"{modality}/{name}: {tuple(tensor.shape)} {tensor.dtype}, merged as {tuple(merged.shape)} "
                    f"{merged.dtype}",
                )
                if exact and tensor.shape == merged.shape:
                    case.require(
                        bool(torch.equal(tensor, merged)),
                        "a tensor rebuilt from a checkpoint whose headers disagree with its manifest is refused",
                        "llm_tensor",
                        f"{modality}/{name} differs from the merged tensor",
                    )
                case.require(
                    bool(tensor.is_floating_point() and torch.isfinite(tensor).all()),
                    "a tensor rebuilt from an accepted checkpoint of finite weights is finite",
                    "llm_tensor",
                    f"{modality}/{name} is {tensor.dtype} and not all finite floats",
                )
    case.call("DecoupledCheckpoint.close", ckpt.close)


def rebuild_all(case: Case, arena: Arena, exact: bool = False) -> None:
    """``reconstruct`` every modality into a fresh folder: whatever the manifest says, nothing lands outside it."""
    folder = arena.work / "rebuild"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    out = folder / "out"
    report = case.call("reconstruct", mmer.reconstruct, arena.checkpoint, out, write_root=folder)
    if report is not None and not isinstance(report, MmerError):
        inside = os.path.realpath(out) + os.sep
        outside = [m.path for m in report.models if not os.path.realpath(m.path).startswith(inside)]
        case.require(not outside, "every rebuilt model is written inside the output", "reconstruct", f"{outside}")
        for model in report.models if not outside else []:
            with CheckpointReader(model.path) as reader:
                bad = [n for n in reader.tensors if not torch.isfinite(reader.get(n, copy=False)).all()]
                if exact and model.modality == "vision":
                    differ = [
                        k
                        for k, t in arena.reconstructed.items()
                        if k not in reader or not torch.equal(reader.get(k), t)
                    ]
                    oracle = "a model rebuilt from a checkpoint whose headers disagree with its manifest is refused"
                    case.require(not differ, oracle, "reconstruct", f"differs from the merge in {differ[:2]}")
            oracle = "a model rebuilt from a checkpoint of finite weights is finite"
            case.require(not bad, oracle, "reconstruct", f"{model.modality}: non-finite {bad[:2]}")


def open_and_verify(
    case: Case,
    arena: Arena,
    load_refusal: str | None,
    verify_failure: str | None,
    always_rebuild: bool = False,
    exact: bool = False,
) -> None:
    loaded = case.call("load_decoupled", mmer.load_decoupled, arena.checkpoint)
    if load_refusal:
        case.refused(loaded, load_refusal, "load_decoupled")
    if isinstance(loaded, DecoupledCheckpoint):
        rebuild_sample(case, arena, loaded, exact)
    if always_rebuild or isinstance(loaded, DecoupledCheckpoint):
        rebuild_all(case, arena, exact)
    report = case.call("verify", verify, arena.checkpoint)
    if isinstance(report, VerifyReport):
        if verify_failure:
            case.require(not report.ok, verify_failure, "verify", "verify says ok")
        if isinstance(loaded, MmerError):
            case.require(
                not report.ok, "verify never passes a checkpoint that load_decoupled refuses", "verify", loaded.message
            )
    elif report is not None and not isinstance(report, MmerError):
        case.require(False, "verify returns a VerifyReport", "verify", repr(report)[:80])


def checkpoint_unchanged(case: Case, arena: Arena, names: set[str]) -> None:
    now = set(tree_state(arena.checkpoint))
    if now != names:
        case.require(False, "reading a checkpoint leaves no files in it", "load_decoupled/verify", f"{now ^ names}")
        for extra in now - names:
            p = arena.checkpoint / extra
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def manifest_edits(paths: list[str]) -> list[tuple[str, str, object]]:
    """Every (kind, field, value) edit a schema must catch although the JSON stays well-formed and the sidecar is
    recomputed: hostile names and paths, numbers out of range or of the wrong type, a newer format, a reference
    base elsewhere. Enumerated, not drawn, so that a few hundred cases cover each one."""
    numbers = [float("nan"), float("inf"), -1, -1.5, 0, 10**400, 1e308, 2**63, "1", True, None, [1]]
    names = ["../../x", "/x", "base", "Vision", "v" * 65, "\uff56ision", "vision/../x", "", ".", "vi\x00on"]
    edits: list[tuple[str, str, object]] = []
    edits += [("modality name", "modalities.vision (key and name)", v) for v in names + paths[:3]]
    for where in ("mask_file", "component_dir", "tau_star_dir", "base_dir", "merged_dir"):
        edits += [("path", where, v) for v in paths + ["masks/vision.safetensors/../../x", "masks", ""]]
    edits += [("files key", "files", v) for v in paths]
    for where in ("scale", "weight", "lambda", "kept", "total", "vocab_size", "kept_per_tensor", "row_start"):
        edits += [("number", where, v) for v in numbers]
    shapes = [[10**12, 10**12], [-1, 16], [], [16] * 65, [0, 16], [16.0, 16], "16", [2**40, 16]]
    edits += [("shape", where, v) for where in ("slot shape", "private shape") for v in shapes]
    dtypes = ["I32", "F64", "BOOL", "X", "", "F32/F16", None]
    edits += [("dtype", where, v) for where in ("tau_star_dtype", "slot dtype", "base.dtype") for v in dtypes]
    versions = ["2.0", "1.9999", "1", "01.0", "1.0.0", 1.0, "", "\uff11.0"]
    edits += [("format_version", "format_version", v) for v in versions]
    edits += [("reference base", "base.model", v) for v in paths[2:4] + ["../x", "org/model", ""]]
    edits += [("llm key", "llm_keys", v) for v in ["../../x", "/x", "", "lm_head.weight", "model.embed_tokens.weight"]]
    edits += [("merged", "slots.merged", v) for v in [False, "yes", 0, None]]
    return edits


def apply_manifest_edit(rng: random.Random, data: dict, edit: tuple[str, str, object]) -> list[str]:
    kind, where, value = edit
    vision = data["modalities"]["vision"]
    slot = rng.choice(data["slots"])
    if kind == "modality name":
        record = data["modalities"].pop("vision")
        record["name"] = value
        data["modalities"][value] = record
    elif kind == "path":
        (vision if where in ("mask_file", "component_dir") else data)[where] = value
    elif kind == "files key":
        old = rng.choice(sorted(data["files"]))
        data["files"][value] = data["files"].pop(old)
        where = f"files[{old!r}] renamed"
    elif kind == "number" and where == "kept_per_tensor":
        name = rng.choice(sorted(vision[where]))
        vision[where][name] = value
        where = f"kept_per_tensor[{name}]"
    elif kind == "number" and where == "row_start":
        rng.choice(vision["private"])["row_start"] = value
    elif kind == "number":
        vision[where] = value
    elif kind == "shape" and where == "private shape":
        rng.choice(vision["private"])["shape"] = value
    elif kind == "shape":
        slot["shape"] = value
        where = f"slots[{slot['name']}].shape"
    elif kind == "dtype":
        if where == "slot dtype":
            slot["dtype"] = value
            where = f"slots[{slot['name']}].dtype"
        elif where == "base.dtype":
            data["base"]["dtype"] = value
        else:
            data["tau_star_dtype"] = value
    elif kind == "format_version":
        data["format_version"] = value
    elif kind == "reference base":
        data["base_storage"] = "reference"
        data["base"]["model"] = value
    elif kind == "llm key":
        name = rng.choice(sorted(vision["llm_keys"]))
        vision["llm_keys"][name] = value
        where = f"llm_keys[{name}]"
    else:
        slot["merged"] = value
        where = f"slots[{slot['name']}].merged"
    return [f"{kind}: {where} = {value!r}"[:160]]


@pytest.mark.parametrize("style", ["bytes", "structure", "semantic"])
def test_a_mutated_manifest_loads_correctly_or_is_refused_and_verify_reports_it(arena, fuzz, style):
    family = f"manifest/{style}"
    run = fuzz(family)
    manifest, sidecar = arena.checkpoint / MANIFEST_NAME, arena.checkpoint / MANIFEST_SHA_NAME
    original, original_sidecar = arena.original(manifest), arena.original(sidecar)
    names = set(tree_state(arena.checkpoint))
    paths = hostile_paths(arena.checkpoint, arena.sentinel)
    edits = manifest_edits(paths)
    for i in case_indices(family, weight=2 if style == "semantic" else 1):
        rng = rng_for(family, i)
        if style == "semantic":
            data = json.loads(original)
            ops = apply_manifest_edit(rng, data, edits[i % len(edits)])
            mutation = Mutation(json.dumps(data, indent=2).encode(), ops)
        else:
            mutation = mutate_bytes(rng, original) if style == "bytes" else mutate_json(rng, original, paths)
        recompute = style == "semantic" or rng.random() < 0.5
        put(manifest, mutation.data)
        put(sidecar, (hashlib.sha256(mutation.data).hexdigest() + "\n").encode() if recompute else original_sidecar)
        ops = [*mutation.ops, "sidecar recomputed" if recompute else "sidecar left stale"]
        case = run.case(i, ops)
        demands = manifest_demands(mutation.data, original, recompute)
        open_and_verify(case, arena, *demands, always_rebuild=style == "semantic")
        checkpoint_unchanged(case, arena, names)
    put(manifest, original)
    put(sidecar, original_sidecar)
    run.finish()


def mask_edits(shapes: dict[str, list[int]]) -> list[tuple[str, object]]:
    """Metadata a mask reader must not take at its word: shapes that fit the stored bytes but not the tensor
    (transposed, flattened, regrouped, one parameter short), shapes for no tensor or none at all, other tags."""
    edits: list[tuple[str, object]] = []
    for name, shape in sorted(shapes.items()):
        numel = math.prod(shape)
        edits += [(f"shapes[{name}]", v) for v in (shape[::-1], [numel], [numel - 1], [numel // 2, 2], None)]
        if len(shape) == 2:
            edits.append((f"shapes[{name}]", [shape[0] * 2, shape[1] // 2]))
    edits += [("shapes[model.extra.weight]", [8]), ("shapes", "{}"), ("shapes", "[]"), ("shapes", "null")]
    edits += [("format", v) for v in ("mmer-mask/2", "mmer-mask/1 ", "")] + [("bit_order", v) for v in ("big", "")]
    edits += [("all bits", 0xFF), ("all bits", 0x00)]
    return edits


def apply_mask_edit(data: bytes, edit: tuple[str, object]) -> bytes:
    header_bytes, body = safetensors_parts(data)
    header = json.loads(header_bytes)
    meta = header["__metadata__"]
    shapes = json.loads(meta["shapes"])
    where, value = edit
    if where == "all bits":
        body = bytes([value]) * len(body)
    elif where.startswith("shapes["):
        name = where[len("shapes[") : -1]
        if value is None:
            shapes.pop(name, None)
        else:
            shapes[name] = value
        meta["shapes"] = json.dumps(shapes, separators=(",", ":"), sort_keys=True)
    else:
        meta[where] = value
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + body


@pytest.mark.parametrize("style", ["bytes", "structure", "semantic"])
def test_mutated_mask_metadata_unpacks_to_its_claimed_shape_or_is_refused(arena, fuzz, style):
    family = f"masks/{style}"
    run = fuzz(family)
    target = arena.checkpoint / "masks" / "vision.safetensors"
    original = arena.original(target)
    names = set(tree_state(arena.checkpoint))
    paths = hostile_paths(target.parent, arena.sentinel)
    edits = mask_edits(json.loads(json.loads(safetensors_parts(original)[0])["__metadata__"]["shapes"]))
    for i in case_indices(family, count=len(edits) if style == "semantic" else None):
        if style == "semantic":  # each edit once: these cases draw nothing at random
            edit = edits[i % len(edits)]
            mutation = Mutation(apply_mask_edit(original, edit), [f"{edit[0]} = {edit[1]!r}"])
        else:
            focus = lambda p: p[0] == "__metadata__"  # noqa: E731
            mutation = mutate_safetensors(rng_for(family, i), original, style, paths, focus=focus)
        put(target, mutation.data)
        case = run.case(i, mutation.ops)
        masks = case.call("MaskFile", MaskFile, target)
        if isinstance(masks, MaskFile):
            for name, shape in masks.shapes.items():
                mask = case.call("MaskFile.mask", masks.mask, name)
                if isinstance(mask, torch.Tensor):
                    case.require(
                        tuple(mask.shape) == tuple(shape) and mask.dtype == torch.bool,
                        "a mask unpacks to the bool shape its metadata claims",
                        "MaskFile.mask",
                        f"{name}: claims {shape}, unpacked {tuple(mask.shape)} {mask.dtype}",
                    )
        changed = mutation.data != original
        open_and_verify(case, arena, None, "verify reports a changed mask file" if changed else None)
        checkpoint_unchanged(case, arena, names)
    put(target, original)
    run.finish()


# LLM weight files: the manifest records every tensor's name, shape and dtype, so a reader can see these edits
LLM_FILES = ("base/model.safetensors", "tau_star/model.safetensors", "components/vision/llm_private.safetensors")


def header_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A well-formed header that lies about one tensor: transposed, renamed, re-typed to another dtype of the
    same width, or missing. Offsets stay valid, so only a check against the manifest can tell."""
    header_bytes, body = safetensors_parts(data)
    header = json.loads(header_bytes)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    kind = rng.choice(("transpose", "rename", "dtype", "drop"))
    if kind == "transpose" and len(entry["shape"]) == 2 and entry["shape"][0] != entry["shape"][1]:
        entry["shape"] = entry["shape"][::-1]
    elif kind == "dtype":
        entry["dtype"] = {"F32": "I32", "F16": "BF16", "BF16": "F16"}.get(entry["dtype"], "F32")
    elif kind == "drop":
        del header[name]
    else:
        kind = "rename"
        header[name + "_x"] = header.pop(name)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + body, f"{kind} {name}"


@pytest.mark.parametrize("style", ["bytes", "semantic"])
def test_a_changed_byte_in_any_checkpoint_file_is_reported_by_verify(arena, fuzz, style):
    family = f"files/{style}"
    run = fuzz(family)
    listed = sorted(json.loads(arena.original(arena.checkpoint / MANIFEST_NAME))["files"])
    originals = {rel: arena.original(arena.checkpoint / rel) for rel in listed}
    names = set(tree_state(arena.checkpoint))
    for i in case_indices(family):
        rng = rng_for(family, i)
        rel = rng.choice(listed if style == "bytes" else LLM_FILES)
        data = originals[rel]
        if style == "bytes":
            hot = (0, 8 + len(safetensors_parts(data)[0])) if rel.endswith(".safetensors") else None
            mutation = mutate_bytes(rng, data, hot=hot)
        else:
            mutation = Mutation(*header_edit(rng, data))
            mutation.ops = [mutation.ops]  # type: ignore[list-item]
        put(arena.checkpoint / rel, mutation.data)
        case = run.case(i, [f"{rel}: {op}" for op in mutation.ops])
        changed = mutation.data != data
        why = f"verify reports a change to {rel}" if changed else None
        open_and_verify(case, arena, None, why, exact=style == "semantic")
        checkpoint_unchanged(case, arena, names)
        put(arena.checkpoint / rel, data)
    run.finish()


# --------------------------------------------------------------------------------------------- recipes, specs


def _yaml_tokens(sentinel: Path) -> list[Raw]:
    """YAML that JSON cannot say: tags that would run code, aliases, a modest alias bomb, YAML-1.1 scalars."""
    levels = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for n in range(1, 6):
        levels.append(f"&l{n} [{', '.join([f'*l{n - 1}'] * 10)}]")
    bomb = "[" + ", ".join(levels) + "]"  # 10**6 leaves from 0.4 kB: must be refused or stay cheap
    pwned = sentinel / "pwned"
    texts = [
        f'!!python/object/apply:os.system ["touch {pwned}"]',
        f'!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ["{pwned}"]]',
        "!!python/name:os.system",
        bomb,
        "&a [*a]",
        "*undefined",
        "!!binary aGVsbG8=",
        "!!set {a, b}",
        "!!timestamp 2001-12-14",
        "2001-12-14",
        ".nan",
        ".inf",
        "-.inf",
        "0x1F",
        "0o17",
        "1_000",
        "1" + "0" * 5000,
        "1e400",
        "yes",
        "~",
        "{<<: {k: 0.5}}",
        "!!float 1",
        "!!int '9'",
        "!!str 0.8",
        "!custom tag",
        "|\n  multi\n  line",
    ]
    return [Raw(t.encode(), t[:50]) for t in texts]


def mutate_yaml(rng: random.Random, text: bytes, style: str, sentinel: Path, paths: list[str]) -> Mutation:
    if style == "bytes":
        return mutate_bytes(rng, text)
    tree = yaml.safe_load(text)
    if style == "structure":
        mutation = mutate_json(rng, json.dumps(tree).encode(), paths)
        if rng.random() < 0.5:  # the same tree in block style, when YAML can say it
            try:
                mutation.data = yaml.safe_dump(json.loads(mutation.data)).encode()
            except (ValueError, RecursionError, yaml.YAMLError):
                pass
        return mutation
    # yaml: a YAML-only construct in place of a value, or wrapped around the document
    roll = rng.random()
    if roll < 0.15:
        variant = rng.choice(
            [
                (b"\xef\xbb\xbf" + text, "byte order mark"),
                (text.replace(b"\n", b"\r\n"), "CRLF line ends"),
                (text + b"---\n" + text, "two documents"),
                (text.replace(b"  ", b"\t"), "tabs for indentation"),
                (text.decode().encode("utf-16"), "UTF-16"),
                (b"[" * 100_000 + b"]" * 100_000, "100000 nested ["),
                (b"a: " + b"{a: " * 500 + b"1" + b"}" * 500, "500 nested {"),
                (text + b"\nbase: {model: other}\n", "duplicate top-level key"),
                (b"%YAML 1.1\n%TAG ! tag:yaml.org,2002:python/\n---\n" + text, "directives"),
            ]
        )
        return Mutation(variant[0], [variant[1]])
    values = [*_yaml_tokens(sentinel), *[v for v in hostile_values(paths) if not isinstance(v, Raw)], nested(500)]
    candidates = list(nodes(tree))
    ops = []
    for _ in range(rng.choice((1, 1, 2))):
        path = rng.choice(candidates)
        value = rng.choice(values)
        put_node(tree, path, value)
        ops.append(f"set {schema_path(path)} = {value!r}"[:120])
        candidates = list(nodes(tree))
    return Mutation(dumps(tree), ops)


def _in(x, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> bool:
    """``x`` is a finite float within the bounds (open or closed at each end)."""
    return (
        isinstance(x, float)
        and math.isfinite(x)
        and (x > lo if lo_open else x >= lo)
        and (x < hi if hi_open else x <= hi)
    )


def spec_is_sound(spec) -> bool:
    return (
        isinstance(spec, ModelSpec)
        and isinstance(spec.model, str)
        and (spec.revision is None or isinstance(spec.revision, str))
        and (spec.modality is None or bool(MODALITY_NAME.fullmatch(spec.modality)))
        and (spec.lambda_ is None or _in(spec.lambda_, 0.0, math.inf, hi_open=True))
        and (spec.weight is None or _in(spec.weight, 0.0, math.inf, lo_open=True, hi_open=True))
    )


def options_are_sound(options) -> bool:
    strings = ("method", "mask", "trim_scope", "trim_count", "zero_sign", "elect_on", "aggregate", "mask_source")
    return (
        isinstance(options, MergeOptions)
        and all(isinstance(getattr(options, k), str) for k in (*strings, "vocab_policy", "delta_dtype", "device"))
        and _in(options.k, 0.0, 1.0, lo_open=True)
        and (options.alpha is None or _in(options.alpha, 0.0, math.inf, lo_open=True, hi_open=True))
        and (options.lambda_ is None or _in(options.lambda_, 0.0, math.inf, hi_open=True))
        and _in(options.dare, 0.0, 1.0, hi_open=True)
        and type(options.dare_seed) is int
        and type(options.shard_size) is int
        and options.shard_size >= 1024
        and type(options.allow_nonfinite) is bool
        and type(options.hash_inputs) is bool
    )


@pytest.mark.parametrize("style", ["bytes", "structure", "yaml"])
def test_a_mutated_recipe_loads_as_sound_values_or_is_refused(arena, fuzz, style):
    family = f"recipe/{style}"
    run = fuzz(family)
    original = arena.original(arena.recipe)
    paths = hostile_paths(arena.recipe.parent, arena.sentinel)
    for i in case_indices(family):
        mutation = mutate_yaml(rng_for(family, i), original, style, arena.sentinel, paths)
        put(arena.recipe, mutation.data)
        case = run.case(i, mutation.ops)
        got = case.call("load_recipe", load_recipe, arena.recipe)
        if isinstance(got, tuple):
            base, models, options = got
            case.require(
                (base is None or spec_is_sound(base)) and all(spec_is_sound(m) for m in models),
                "every model spec of an accepted recipe holds sound values",
                "load_recipe",
                f"{base!r:.100} {models!r:.200}",
            )
            oracle = "an accepted recipe's options hold sound values"
            case.require(options_are_sound(options), oracle, "load_recipe", f"{options!r:.300}")
            if base is not None:
                case.call("Recipe", Recipe, base, models, options)
    put(arena.recipe, original)
    run.finish()


@pytest.mark.parametrize("style", ["bytes", "structure", "yaml"])
def test_a_mutated_model_spec_loads_as_sound_values_or_is_refused(arena, fuzz, style):
    family = f"spec/{style}"
    run = fuzz(family)
    original = arena.original(arena.spec)
    paths = hostile_paths(arena.spec.parent, arena.sentinel)
    for i in case_indices(family):
        mutation = mutate_yaml(rng_for(family, i), original, style, arena.sentinel, paths)
        put(arena.spec, mutation.data)
        case = run.case(i, mutation.ops)
        spec = case.call("load_spec", load_spec, arena.spec)
        if spec is not None and not isinstance(spec, MmerError):
            oracle = "an accepted model spec holds sound values"
            case.require(spec_is_sound(spec), oracle, "load_spec", f"{spec!r:.200}")
    put(arena.spec, original)
    run.finish()
