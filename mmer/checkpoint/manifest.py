"""The manifest of a decoupled checkpoint: what is where, how it was made, and hashes of every file.

It is plain JSON (``mmer_manifest.json``) so any tool can read it; this module gives it types and is the one
way in. A manifest is untrusted input (a checkpoint may come from anyone), so :func:`read_manifest` reads its
bytes once, checks them against the ``.sha256`` sidecar, parses those same bytes with the bounded JSON parser,
and validates them against the schema below before any field is used: a name that is not a name, a path that
leaves the checkpoint, ``"1"`` where a count belongs, an infinite scale, is refused naming the key. The schema
is carried by pydantic over the dataclasses themselves (the type annotations *are* the schema), with the few
rules that tie fields together in :func:`_consistency_problems`.

The compatibility rule: readers accept any ``format_version`` with a major number they know and ignore keys they
do not know, and refuse a newer major (a wrong merge is worse than a failed one). A checkpoint is written with the
lowest version that describes it: 1.0, or 2.0 when τ* is stored quantised (``tau_star_encoding``), so a reader
that predates the encoding refuses it by its major number instead of reading integer codes as τ*.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, Strict, TypeAdapter, ValidationError

from mmer.config import MAX_TAU_GROUP_SIZE, MODALITY_NAME, RESERVED_MODALITY_NAMES
from mmer.errors import DecoupledFormatError, MmerError
from mmer.io.jsonfile import MAX_JSON_BYTES, loads_bounded
from mmer.io.layouts import LAYOUTS, is_buffer_name, is_vocab_tensor, layout_named
from mmer.io.paths import check_inside
from mmer.io.reader import SAFETENSORS_DTYPES

MANIFEST_NAME = "mmer_manifest.json"
MANIFEST_SHA_NAME = "mmer_manifest.json.sha256"  # the manifest's own hash: with `files`, every byte is covered
FORMAT_NAME = "mmer-decoupled"
FORMAT_VERSION = "1.0"
QUANTISED_FORMAT_VERSION = "2.0"  # τ* stored as codes + scales: a 1.x reader must refuse it (FORMAT.md)
READABLE_MAJORS = ("1", "2")

MASKS_DIR = "masks"
COMPONENTS_DIR = "components"
BASE_DIR = "base"
TAU_STAR_DIR = "tau_star"
MERGED_DIR = "."
EDITED_HINT = "the manifest was edited after the merge; re-run the merge, or run `mmer verify` to see what changed"
SCHEMA_HINT = (
    "the manifest does not follow FORMAT.md (hand-edited, corrupt or hostile); re-run the merge, or run "
    "`mmer verify` to list every problem"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# EMR's rescaler sᵢ = Σ mean|τᵢ| / Σ mean|mᵢ∘τ*| restores the kept τ*'s magnitude to the fine-tune's: it is above 1
# by about 1/(α · the fraction kept), so tens for a sparse TIES merge. 1e6 would mean the kept entries carry a
# millionth of what the model learned, a merge that has already lost it; beyond that a scale only serves to
# push rebuilt weights to ±inf. Never 0 or negative: the writer's ratio of magnitudes is positive, or 1.
MAX_SCALE = 1e6
EXCLUDED = "vocab_policy=exclude"  # a slot's reason when each model keeps its own copy (FORMAT.md, Private tensors)


# ------------------------------------------------------------------------------------------ field types
def _modality_name(name: str) -> str:
    if not MODALITY_NAME.fullmatch(name):
        raise ValueError(f"modality name {name[:80]!r} does not match {MODALITY_NAME.pattern}")
    if name in RESERVED_MODALITY_NAMES:
        raise ValueError(f"modality name {name!r} is reserved ({', '.join(RESERVED_MODALITY_NAMES)})")
    return name


def _sha256_hex(digest: str) -> str:
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"{digest[:80]!r} is not a sha256 (64 lowercase hex digits)")
    return digest


def _relative_path(rel: str) -> str:
    if not is_relative_inside(rel):
        raise ValueError(f"path {rel[:200]!r} points outside the checkpoint")
    return rel


def _plain_file_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or ":" in name or "\0" in name:
        raise ValueError(f"{name[:200]!r} is not a plain file name")
    return name


def _layout(name: str) -> str:
    if layout_named(name) is None:
        raise ValueError(f"layout {name[:80]!r} is not one of {', '.join(LAYOUTS)} or structure:<body>|<head>")
    return name


def _dtype_list(value: str) -> str:
    """One safetensors dtype name, or several joined by ``/`` (empty when there is none)."""
    unknown = [d for d in value.split("/") if d not in SAFETENSORS_DTYPES] if value else []
    if unknown:
        raise ValueError(f"dtype {unknown[0][:40]!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    return value


def _dtype(value: str) -> str:
    if value not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {value[:40]!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    return value


Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Count = Annotated[int, Strict(), Field(ge=0, lt=1 << 63)]  # counts, sizes and dims: non-negative int64
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Scale = Annotated[float, Strict(), Field(allow_inf_nan=False, gt=0, le=MAX_SCALE)]
KeptFraction = Annotated[float, Strict(), Field(allow_inf_nan=False, gt=0, le=1)]  # a trim's K
DropRate = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=0, lt=1)]  # DARE's p
ModalityName = Annotated[str, Strict(), AfterValidator(_modality_name)]
Sha256 = Annotated[str, Strict(), AfterValidator(_sha256_hex)]
RelativePath = Annotated[str, Strict(), AfterValidator(_relative_path)]
FileName = Annotated[str, Strict(), AfterValidator(_plain_file_name)]
LayoutName = Annotated[str, Strict(), AfterValidator(_layout)]
DtypeName = Annotated[str, Strict(), AfterValidator(_dtype)]
DtypeNames = Annotated[str, Strict(), AfterValidator(_dtype_list)]


@dataclass
class TauEncoding:
    """How τ* is stored when not exact: integer codes plus one float32 scale per group (FORMAT.md, Quantised τ*)."""

    scheme: Literal["int8", "int4"]
    group_size: Annotated[int, Strict(), Field(ge=1, le=MAX_TAU_GROUP_SIZE)]
    scale_dtype: Literal["F32"] = "F32"


@dataclass
class SourceRecord:
    """Where an input model came from, exactly enough to fetch the same bytes again."""

    model: Str
    revision: Str | None
    commit: Str | None
    layout: LayoutName
    dtype: DtypeNames
    config: Str | None
    files: dict[FileName, Sha256 | None]  # weight file name → sha256 (None when hashing was turned off)


@dataclass
class SlotRecord:
    """One canonical LLM tensor of the base: its shape and dtype, and how it was treated."""

    name: Str
    shape: list[Count]
    dtype: DtypeName
    merged: Bool
    reason: Str | None = None  # why not merged: "buffer", "integer dtype", "vocab_policy=exclude"


@dataclass
class PrivateRecord:
    """A model-private LLM tensor: vocabulary rows past the base's, or a whole unmerged tensor."""

    name: Str  # canonical name
    row_start: Count  # first row of the model's own tensor this slice holds (0 = the whole tensor)
    shape: list[Count]


@dataclass
class ModalityRecord:
    """One fine-tuned model: its source, mask, component and private LLM tensors."""

    name: ModalityName
    source: SourceRecord
    lambda_: Annotated[Finite | None, Field(alias="lambda")]
    mask_file: RelativePath | None  # None for a single merged model (mask rule "none")
    component_dir: RelativePath
    kept: Count
    total: Count
    llm_keys: dict[Str, Str]  # canonical name → the source's own on-disk key (for writing it back)
    component_tensors: list[Str]
    private: list[PrivateRecord] = field(default_factory=list)
    vocab_size: Count | None = None
    kept_per_tensor: dict[Str, Count] = field(default_factory=dict)  # canonical name → set bits of its mask
    scale: Scale = 1.0  # EMR's rescaler sᵢ in θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ* (1 for every other rule)
    weight: Finite = 1.0  # the model's merge weight
    k: KeptFraction | None = None  # the model's own trim K, when its spec gave one (else options.k); absent if None
    dare: DropRate | None = None  # the model's own DARE p, when its spec gave one (else options.dare); absent if None

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0


@dataclass
class Manifest:
    """Everything a reader needs before touching a weight."""

    mmer_version: Str
    options: dict[Str, Any]
    base: SourceRecord
    base_storage: Literal["copy", "reference"]  # "copy" (under base/) or "reference" (fetch base.source again)
    base_dir: RelativePath | None
    tau_star_dir: RelativePath | None  # None for a single merged model
    tau_star_dtype: DtypeNames
    slots: list[SlotRecord]
    modalities: dict[ModalityName, ModalityRecord]
    files: dict[RelativePath, Sha256] = field(default_factory=dict)  # relative path → sha256 of every other file
    merged_dir: RelativePath | None = None  # "." when the output is one merged model (mask rule "none")
    tau_star_encoding: TauEncoding | None = None  # None (absent): τ* stored exact, in tau_star_dtype
    format: Str = FORMAT_NAME
    format_version: Str = FORMAT_VERSION

    # ------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for record in data["modalities"].values():
            record["lambda"] = record.pop("lambda_")
            record["density"] = record["kept"] / record["total"] if record["total"] else 0.0
            for own in ("k", "dare"):  # a model's own K and p: written only where given, so others read as before
                if record[own] is None:
                    del record[own]
        if data["tau_star_encoding"] is None:  # exact τ*: the 1.0 manifest, byte for byte as before the encoding
            del data["tau_star_encoding"]
        return {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}

    def write(self, directory: Path) -> Path:
        """Write the manifest and, beside it, its sha256 (so a changed manifest is caught too)."""
        path = directory / MANIFEST_NAME
        data = (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode("utf-8")
        path.write_bytes(data)
        (directory / MANIFEST_SHA_NAME).write_text(hashlib.sha256(data).hexdigest() + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """The checkpoint's manifest, checked against its sidecar and the schema (see :func:`read_manifest`)."""
        manifest = read_manifest(directory)
        assert manifest is not None  # without a problem list, every problem raises
        return manifest

    @classmethod
    def from_dict(cls, data: Any, file: str = MANIFEST_NAME) -> Manifest:
        """Validate a parsed manifest against the schema; the first problem is raised naming its key."""
        manifest = validate_manifest(data, file)
        assert manifest is not None
        return manifest

    def referenced_paths(self) -> list[str]:
        paths = [*self.files]
        for optional in (self.tau_star_dir, self.base_dir, self.merged_dir):
            if optional:
                paths.append(optional)
        for m in self.modalities.values():
            paths += [p for p in (m.mask_file, m.component_dir) if p]
        return paths


def mask_file_name(modality: str) -> str:
    """Where a modality's packed masks live, relative to the checkpoint (the only place a writer puts them)."""
    return f"{MASKS_DIR}/{modality}.safetensors"


def component_dir_name(modality: str) -> str:
    """Where a modality's own tensors and side files live, relative to the checkpoint."""
    return f"{COMPONENTS_DIR}/{modality}"


# ------------------------------------------------------------------------------------------------ reading
def read_manifest(directory: str | Path, problems: list[MmerError] | None = None) -> Manifest | None:
    """Read, check and validate the manifest of the checkpoint at ``directory``: the one way into one.

    The bytes are read once and the same bytes are hashed, parsed and validated, so nothing can change between
    the check and the use. Without ``problems`` the first problem is raised; with it (``mmer verify``), every
    problem is appended and the manifest is returned when it is still safe to use (only its sidecar disagreed)
    or ``None`` when it is not.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        raw = _read_small(directory, MANIFEST_NAME, MAX_JSON_BYTES)
        if raw is None:
            err = DecoupledFormatError(
                f"{directory}: no {MANIFEST_NAME}; not a decoupled checkpoint",
                file=str(path),
                hint="point to the output directory of `mmer merge`",
            )
            err.exit_code = 2  # pointing at the wrong directory is a usage error, not a damaged checkpoint
            raise err
    except MmerError as err:
        return _fail(err, problems)
    try:
        check_sidecar(directory, raw)
    except MmerError as err:
        if problems is None:
            raise
        problems.append(err)
    try:
        data = loads_bounded(raw, path, what="manifest", error=DecoupledFormatError, hint=SCHEMA_HINT)
    except MmerError as err:
        return _fail(err, problems)
    return validate_manifest(data, str(path), problems)


def check_sidecar(directory: Path, raw: bytes) -> None:
    """Refuse manifest bytes whose sha256 is not the one in ``mmer_manifest.json.sha256`` (or with none)."""
    sidecar = directory / MANIFEST_SHA_NAME
    recorded = _read_small(directory, MANIFEST_SHA_NAME, 1024)
    if recorded is None:
        raise DecoupledFormatError(
            f"{sidecar}: missing, so the manifest itself cannot be checked",
            file=str(sidecar),
            hint=f"{EDITED_HINT}; every checkpoint mmer writes has this file",
        )
    digest = hashlib.sha256(raw).hexdigest()
    if recorded not in (digest.encode() + b"\n", digest.encode()):
        raise DecoupledFormatError(
            f"{directory / MANIFEST_NAME}: its sha256 differs from {MANIFEST_SHA_NAME} (modified or corrupt)",
            file=str(directory / MANIFEST_NAME),
            hint=EDITED_HINT,
        )


def _read_small(directory: Path, name: str, limit: int) -> bytes | None:
    """The bytes of ``directory/name`` (``None`` when absent), read from where it really is inside the checkpoint."""
    path = directory / name
    if not os.path.lexists(path):
        return None
    real = check_inside(directory, path, what="manifest file")
    if not real.is_file():  # a directory, a FIFO that would block, a device: never read
        raise DecoupledFormatError(f"{path}: not a regular file", file=str(path), hint=SCHEMA_HINT)
    try:
        with open(real, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise DecoupledFormatError(
            f"{path}: cannot read ({err.strerror or err})", file=str(path), hint="check the file's permissions"
        ) from None
    if len(raw) > limit:
        raise DecoupledFormatError(
            f"{path}: over the {limit}-byte limit for this file", file=str(path), hint=SCHEMA_HINT
        )
    return raw


def _fail(err: MmerError, problems: list[MmerError] | None) -> None:
    if problems is None:
        raise err
    problems.append(err)
    return None


@cache
def _schema() -> TypeAdapter[Manifest]:
    return TypeAdapter(Manifest)


def validate_manifest(data: Any, file: str, problems: list[MmerError] | None = None) -> Manifest | None:
    """Check a parsed manifest: format and version, then the schema, then the rules that tie fields together."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return _fail(
            DecoupledFormatError(
                f"{file}: not an mmer manifest (format != {FORMAT_NAME!r})", file=file, key="format", hint=SCHEMA_HINT
            ),
            problems,
        )
    version = data.get("format_version")
    major = version.split(".")[0] if isinstance(version, str) else ""
    if major not in READABLE_MAJORS:
        newer = major.isdigit() and len(major) < 10 and int(major) > int(READABLE_MAJORS[-1])
        readable = " and ".join(f"{m}.x" for m in READABLE_MAJORS)
        return _fail(
            DecoupledFormatError(
                f"{file}: format_version {str(version)[:40]} is not readable by this mmer (reads {readable})",
                file=file,
                key="format_version",
                hint="upgrade mmer" if newer else SCHEMA_HINT,
            ),
            problems,
        )
    try:
        manifest = _schema().validate_python(data)
    except ValidationError as err:
        found = [_schema_error(file, e) for e in err.errors(include_url=False)]
        if problems is None:
            first = found[0]
            if len(found) > 1:
                first.message += f" (and {len(found) - 1} more problem(s); `mmer verify` lists them)"
            raise first from None
        problems.extend(found)
        return None
    found = _consistency_problems(manifest, file)
    if found:
        if problems is None:
            raise found[0]
        problems.extend(found)
        return None
    return manifest


def _dotted(loc: tuple[Any, ...]) -> str:
    """``("modalities", "vision", "kept")`` → ``modalities.vision.kept``; odd keys quoted, list items ``[i]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{json.dumps(str(part)[:200])}]"
    return out


def _schema_error(file: str, error: Any) -> DecoupledFormatError:
    loc = tuple(error.get("loc", ()))
    key = _dotted(loc) or "(the manifest)"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "required key is missing"
    elif "[key]" in loc:
        message = f"invalid key: {message}"
    elif error.get("type") not in ("value_error",):
        found = error.get("input")
        kind = {dict: "a JSON object", list: "a JSON array"}.get(type(found))
        shown = kind or json.dumps(found if isinstance(found, (str, int, float, bool)) else None)[:80]
        message = f"{message}, found {shown}"
    return DecoupledFormatError(f"{file}: malformed manifest: {key}: {message}", file=file, key=key, hint=SCHEMA_HINT)


def _consistency_problems(manifest: Manifest, file: str) -> list[DecoupledFormatError]:
    """The rules no single field can state: names agree with keys, paths are the ones the writer uses."""
    found: list[DecoupledFormatError] = []

    def bad(key: str, why: str) -> None:
        found.append(
            DecoupledFormatError(f"{file}: malformed manifest: {key}: {why}", file=file, key=key, hint=SCHEMA_HINT)
        )

    single = manifest.merged_dir is not None
    if manifest.merged_dir not in (None, MERGED_DIR):
        bad("merged_dir", f"must be {MERGED_DIR!r} or null")
    if manifest.tau_star_dir != (None if single else TAU_STAR_DIR):
        bad(
            "tau_star_dir",
            f"must be {'null' if single else repr(TAU_STAR_DIR)} when merged_dir is {manifest.merged_dir!r}",
        )
    if manifest.base_dir != (BASE_DIR if manifest.base_storage == "copy" else None):
        bad("base_dir", f'must be {BASE_DIR!r} when base_storage is "copy", else null')
    quantised = manifest.tau_star_encoding is not None
    if quantised and single:
        bad("tau_star_encoding", "a single merged model stores no τ* to encode; must be absent")
    wanted_major = QUANTISED_FORMAT_VERSION.split(".")[0] if quantised else FORMAT_VERSION.split(".")[0]
    if manifest.format_version.split(".")[0] != wanted_major:
        bad(
            "format_version",
            f"{manifest.format_version[:40]!r} with "
            + ("a quantised τ* (tau_star_encoding) must be 2.x" if quantised else "an exact τ* must be 1.x")
            + " (a 1.x reader must refuse integer codes by the major number)",
        )
    names = [s.name for s in manifest.slots]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        bad("slots", f"slot {duplicate[:200]!r} is listed twice")
    for key, record in manifest.modalities.items():
        where = f"modalities.{key}"
        if record.name != key:
            bad(f"{where}.name", f"{record.name!r} differs from its key {key!r}")
            continue
        wanted_mask = None if single else mask_file_name(key)
        if record.mask_file != wanted_mask:
            bad(f"{where}.mask_file", f"must be {'null' if wanted_mask is None else repr(wanted_mask)}")
        if record.component_dir != component_dir_name(key):
            bad(f"{where}.component_dir", f"must be {component_dir_name(key)!r}")
        if record.kept > record.total:
            bad(f"{where}.kept", f"{record.kept} parameters kept of {record.total}")
        written = list(record.llm_keys.values())  # a rebuilt model writes each tensor under its own key
        if len(set(written)) != len(written):
            twice = next(k for k in written if written.count(k) > 1)
            bad(f"{where}.llm_keys", f"two tensors are written back under the same key {twice[:200]!r}")
    slots = {s.name: s for s in manifest.slots}
    for i, slot in enumerate(manifest.slots):
        for why in _slot_problems(slot):
            bad(f"slots[{i}]", f"{slot.name[:200]!r}: {why}")
    for key, record in manifest.modalities.items():
        for i, why in _private_problems(record, slots, manifest.options.get("vocab_policy")):
            bad(f"modalities.{key}.private" + ("" if i is None else f"[{i}]"), why)
    return found


def _slot_problems(slot: SlotRecord) -> list[str]:
    """What the writer never records for a slot: merged integers, vocabulary tensors that are not [rows, dim]."""
    found = []
    if slot.merged and not SAFETENSORS_DTYPES[slot.dtype].is_floating_point:
        found.append(f"merged, but its dtype {slot.dtype} is not floating point (only float weights are merged)")
    if slot.merged and slot.reason is not None:
        found.append(f"merged, yet it records why it was not ({slot.reason[:80]!r})")
    if is_vocab_tensor(slot.name) and len(slot.shape) != 2:
        found.append(f"a vocabulary tensor has shape {slot.shape[:8]}, not [rows, hidden]")
    if slot.reason == EXCLUDED and not is_vocab_tensor(slot.name):
        found.append(f"only vocabulary tensors are kept out under {EXCLUDED}")
    return found


def _private_problems(
    record: ModalityRecord, slots: dict[str, SlotRecord], vocab_policy: Any
) -> list[tuple[int | None, str]]:
    """A private record must be what the writer makes of its slot (FORMAT.md, Private tensors): the whole tensor
    (``row_start`` 0) of a slot kept out under ``vocab_policy = exclude``, or the rows a model appended past the
    base's (``row_start`` = the slot's rows) under ``shared-rows``; same trailing dims; ``vocab_size`` rows."""
    found: list[tuple[int | None, str]] = []
    seen: set[str] = set()
    for i, p in enumerate(record.private):
        slot = slots.get(p.name)
        if p.name in seen:
            found.append((i, f"{p.name[:200]!r} is listed twice"))
            continue
        seen.add(p.name)
        if slot is None or is_buffer_name(p.name) or not is_vocab_tensor(p.name):
            found.append((i, f"{p.name[:200]!r} is not a vocabulary tensor of the base's slots"))
            continue
        if len(slot.shape) != 2 or len(p.shape) != 2 or p.shape[1:] != slot.shape[1:]:
            found.append((i, f"{p.name!r} has shape {p.shape[:8]}, which does not fit the slot's {slot.shape[:8]}"))
            continue
        if slot.reason == EXCLUDED:
            rows = p.shape[0]
            if p.row_start != 0:
                found.append((i, f"{p.name!r} is kept out of the merge ({EXCLUDED}), so row_start must be 0"))
                continue
        else:
            rows = p.row_start + p.shape[0]
            if vocab_policy == "exclude" or p.row_start != slot.shape[0] or p.shape[0] < 1:
                found.append(
                    (
                        i,
                        f"{p.name!r}: row_start {p.row_start} with {p.shape[0]} rows; a merged slot of "
                        f"{slot.shape[0]} rows takes only rows appended past them (row_start {slot.shape[0]}, "
                        "vocab_policy shared-rows)",
                    )
                )
                continue
        if p.name == "model.embed_tokens.weight" and record.vocab_size is not None and rows != record.vocab_size:
            found.append((i, f"{p.name!r} has {rows} rows, but vocab_size is {record.vocab_size}"))
    for name, slot in slots.items():
        if slot.reason == EXCLUDED and name not in seen:
            found.append((None, f"{name!r} is kept out of the merge ({EXCLUDED}) but the model's copy is not listed"))
    embed = slots.get("model.embed_tokens.weight")
    if (
        embed is not None
        and embed.shape
        and record.vocab_size is not None
        and "model.embed_tokens.weight" not in seen
        and record.vocab_size != embed.shape[0]
    ):
        found.append((None, f"vocab_size is {record.vocab_size}, but the model's embeddings are the base's"))
    return found


def is_relative_inside(rel: str) -> bool:
    """True when a manifest path stays inside the checkpoint (relative, no ``..``, no drive or backslash)."""
    p = PurePosixPath(rel)
    return bool(rel) and not (p.is_absolute() or ".." in p.parts or "\\" in rel or ":" in rel or "\0" in rel)


def check_relative(rel: str, file: str) -> None:
    """Refuse a manifest path that would leave the checkpoint directory (absolute, ``..``, drive letters)."""
    if not is_relative_inside(rel):
        raise DecoupledFormatError(
            f"{file}: path {rel!r} points outside the checkpoint",
            file=file,
            key=rel,
            hint="manifest paths must be relative and stay inside the checkpoint; this file may be hostile",
        )
