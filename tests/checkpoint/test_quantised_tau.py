"""τ* stored quantised (``tau_storage: int8 | int4``): storage only, read back through the one loader.

The masks come from the exact τ*, every reader sees the dequantised τ* the same way, a 1.x reader refuses the
checkpoint by its format version, and a file or manifest that says anything no writer writes is refused naming
the file, the tensor or key, and a fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint import manifest as manifest_module
from mmer.checkpoint import quant
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, Manifest
from mmer.config import MergeOptions
from mmer.errors import ConfigError, DecoupledFormatError, MmerError, NonFiniteError
from mmer.inspect import inspect_masks
from mmer.io.reader import CheckpointReader
from mmer.route.reconstruct import reconstruct
from mmer.verify import verify

TAU_FILE = Path("tau_star") / "model.safetensors"


# ------------------------------------------------------------------------------------------------- the maths
def bound(scales: torch.Tensor, cols: int, group_size: int, qmax: int) -> torch.Tensor:
    """Half of each entry's group scale, the most round-to-nearest can be off, plus float32's rounding of x / s and
    of q·s (FORMAT.md: |x − q·s| ≤ (s/2)(1 + 4·qmax·2⁻²⁴))."""
    return scales.repeat_interleave(group_size, dim=-1)[..., :cols] / 2 * (1 + 4 * qmax * 2**-24)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("rows", "cols", "group_size"), [(7, 64, 16), (5, 13, 4), (3, 9, 128), (4, 10, 1), (1, 1, 8)])
def test_each_entry_comes_back_within_half_its_groups_scale(scheme, rows, cols, group_size):
    g = torch.Generator().manual_seed(rows * cols + group_size)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 2, rows).unsqueeze(1)
    x[0, : min(cols, group_size)] = 0  # a group of zeros: scale 1, codes 0, back exactly
    codes, scales = quant.quantise_rows(x, scheme, group_size)
    assert codes.dtype == quant.SCHEMES[scheme].code_dtype
    assert tuple(codes.shape) == quant.codes_shape((rows, cols), scheme)
    assert tuple(scales.shape) == quant.scales_shape((rows, cols), group_size)
    assert bool((scales > 0).all()) and bool(scales.isfinite().all())
    back = quant.dequantise_rows(codes, scales, cols, scheme, group_size, torch.float32)
    assert bool(((back - x).abs() <= bound(scales, cols, group_size, quant.SCHEMES[scheme].qmax)).all())
    assert torch.equal(back[0, : min(cols, group_size)], torch.zeros(min(cols, group_size)))
    # the largest magnitude of each group is stored exactly as ±qmax·s
    qmax = quant.SCHEMES[scheme].qmax
    padded = torch.nn.functional.pad(x.abs(), (0, scales.shape[1] * group_size - cols)).view(rows, -1, group_size)
    nonzero = padded.amax(-1) > 0
    assert torch.allclose((scales * qmax)[nonzero], padded.amax(-1)[nonzero], rtol=1e-6)


def test_int4_codes_are_packed_as_format_md_says_low_nibble_first():
    # groups of 4: [3.5, -1.75, 0.5, 0] has s = 3.5/7 = 0.5 → codes 7, round(-3.5) = -4 (half to even), 1, 0;
    # [7.0] has s = 1 → code 7. Bytes: 7 | (-4 & 0xF) << 4 = 0xC7; 1 | 0 << 4 = 0x01; 7 and a zero pad nibble.
    x = torch.tensor([[3.5, -1.75, 0.5, 0.0, 7.0]])
    codes, scales = quant.quantise_rows(x, "int4", 4)
    assert codes.tolist() == [[0xC7, 0x01, 0x07]]
    assert scales.tolist() == [[0.5, 1.0]]
    assert quant.pack_int4(torch.tensor([[1, -1, 7, -7, 0]], dtype=torch.int8)).tolist() == [[0xF1, 0x97, 0x00]]
    assert quant.unpack_int4(torch.tensor([[0xF1, 0x97, 0x00]], dtype=torch.uint8), 5).tolist() == [[1, -1, 7, -7, 0]]


def test_int8_codes_are_round_to_nearest_even_of_x_over_the_groups_absmax_over_127():
    codes, scales = quant.quantise_rows(torch.tensor([[31.75, -0.125, 0.25, 0.375]]), "int8", 3)
    assert scales.tolist() == [[0.25, float(torch.tensor(0.375) / 127)]]  # float32, as stored
    assert codes.tolist() == [[127, 0, 1, 127]]  # -0.5 → 0 (half to even)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_tau_holding_nan_or_inf_has_no_scale_and_is_refused(bad):
    x = torch.randn(2, 8)
    x[1, 3] = bad
    with pytest.raises(NonFiniteError) as caught:
        quant.quantise_rows(x, "int8", 4, tensor="τ* of w")
    assert caught.value.key == "tau_storage" and "exact" in caught.value.hint


def test_a_tensor_is_dequantised_in_blocks_to_the_same_values():
    x = torch.randn(33, 5)
    codes, scales = quant.quantise_rows(x, "int4", 2)
    whole = quant.dequantise_rows(codes, scales, 5, "int4", 2, torch.bfloat16)
    old, quant.BLOCK_ELEMENTS = quant.BLOCK_ELEMENTS, 7
    try:
        blocked = quant.dequantise(codes, scales, (33, 5), "int4", 2, torch.bfloat16, file="f", tensor="t")
    finally:
        quant.BLOCK_ELEMENTS = old
    assert torch.equal(whole, blocked)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def merges(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantised")
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    out = {}
    for name, options in {
        "exact": {},
        "int8": {"tau_storage": "int8", "tau_group_size": 16},
        "int4": {"tau_storage": "int4", "tau_group_size": 5},  # a group size that divides no hidden size here
    }.items():
        out[name] = root / name
        mmer.run_merge(recipe_for(tiny_models["base_dir"], models, **options), out[name])
    return out


def test_the_default_writes_format_1_0_with_no_trace_of_the_option(merges):
    data = json.loads((merges["exact"] / MANIFEST_NAME).read_text())
    assert data["format_version"] == "1.0" and "tau_star_encoding" not in data
    assert "tau_storage" not in data["options"] and "tau_group_size" not in data["options"]
    assert "tau_storage" not in (merges["exact"] / "mmer_recipe.yaml").read_text()


@pytest.mark.parametrize(("scheme", "group_size"), [("int8", 16), ("int4", 5)])
def test_a_quantised_checkpoint_records_its_encoding_and_is_format_2(merges, scheme, group_size):
    data = json.loads((merges[scheme] / MANIFEST_NAME).read_text())
    assert data["format_version"] == "2.0"
    assert data["tau_star_encoding"] == {"scheme": scheme, "group_size": group_size, "scale_dtype": "F32"}
    assert data["options"]["tau_storage"] == scheme and data["options"]["tau_group_size"] == group_size
    assert (
        f"τ* is stored as {scheme} codes with one float32 scale per {group_size} entries"
        in (merges[scheme] / "README.md").read_text()
    )  # the model card says so; the exact card does not (output pins)
    with safe_open(str(merges[scheme] / TAU_FILE), "pt") as f:
        meta = f.metadata()
        said = (meta["format"], meta["scheme"], meta["group_size"])
        assert said == (quant.QUANTISED_FORMAT, scheme, str(group_size))
        for slot in (s for s in data["slots"] if s["merged"]):
            codes, scales = f.get_slice(slot["name"]), f.get_slice(slot["name"] + quant.SCALES_SUFFIX)
            assert tuple(codes.get_shape()) == quant.codes_shape(slot["shape"], scheme)
            assert tuple(scales.get_shape()) == quant.scales_shape(slot["shape"], group_size)
            assert codes.get_dtype() == ("I8" if scheme == "int8" else "U8") and scales.get_dtype() == "F32"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_masks_and_everything_but_tau_are_the_exact_merges_byte_for_byte(merges, scheme):
    exact, quantised = (json.loads((merges[k] / MANIFEST_NAME).read_text()) for k in ("exact", scheme))
    for rel, digest in exact["files"].items():
        if not rel.startswith("tau_star/") and rel not in ("README.md", "mmer_recipe.yaml"):
            assert quantised["files"][rel] == digest, rel  # masks from the exact τ*: storage changes nothing else
    for name in exact["modalities"]:
        assert quantised["modalities"][name]["kept"] == exact["modalities"][name]["kept"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_rebuilt_entry_is_within_half_a_scale_of_the_exact_rebuild(merges, scheme):
    with mmer.load_decoupled(merges["exact"]) as exact, mmer.load_decoupled(merges[scheme]) as q:
        encoding = q.tau_star_encoding
        reader = CheckpointReader(merges[scheme] / "tau_star")
        for slot in q.merged_slots:
            tau, tau_q = exact.tau_star(slot.name), q.tau_star(slot.name)
            assert tau_q.dtype == tau.dtype and tau_q.shape == tau.shape
            scales = reader.get(slot.name + quant.SCALES_SUFFIX)
            cols = slot.shape[-1] if slot.shape else 1
            qmax = quant.SCHEMES[encoding.scheme].qmax
            limit = bound(scales.reshape(-1, scales.shape[-1]), cols, encoding.group_size, qmax).reshape(tau.shape)
            assert bool(((tau_q.float() - tau.float()).abs() <= limit).all()), slot.name
            for modality in q.modalities:
                rebuilt = q.llm_tensor(modality, slot.name)
                base, mask = q.base_tensor(slot.name), q.mask(modality, slot.name)
                expected = (base.float() + torch.where(mask, tau_q.float(), 0)).to(base.dtype)
                assert torch.equal(rebuilt[: base.shape[0]], expected)
        reader.close()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_verify_reconstruct_and_inspect_read_a_quantised_checkpoint(merges, scheme, tmp_path):
    report = verify(merges[scheme], sources=True)
    assert report.ok, report.problems
    assert report.tau_star_checked == sum(1 for _ in mmer.load_decoupled(merges[scheme]).merged_slots)
    assert report.reconstruction["vision"].rel_l1 < 0.2
    reconstruct(merges[scheme], tmp_path / "rebuilt")
    with mmer.load_decoupled(merges[scheme]) as ckpt:
        record = ckpt.modality("vision")
        rebuilt = CheckpointReader(tmp_path / "rebuilt" / "vision")
        for slot in ckpt.slots:
            assert torch.equal(rebuilt.get(record.llm_keys[slot.name]), ckpt.llm_tensor("vision", slot.name))
        rebuilt.close()
    assert inspect_masks(merges[scheme]) is not None


def test_a_router_loads_a_quantised_checkpoint_to_the_weights_reconstruct_writes(demo_models, tmp_path):
    from mmer.config import build_recipe
    from mmer.route.router import Router

    out = tmp_path / "int4"
    mmer.run_merge(build_recipe(list(demo_models.specs), tau_storage="int4", tau_group_size=32), out)
    reconstruct(out, tmp_path / "rebuilt")
    router = Router.from_pretrained(out)
    with mmer.load_decoupled(out) as ckpt:
        for modality in ("audio", "vision", "audio"):
            router.switch(modality)
            written = CheckpointReader(tmp_path / "rebuilt" / modality)
            keys = ckpt.modality(modality).llm_keys
            for name, tensor in router.llm_state().items():
                assert torch.equal(tensor, written.get(keys[name])), (modality, name)
            written.close()


# ------------------------------------------------------------------------------------------------- refusals
def copy_of(merged: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(merged, out)
    return out


def edit_manifest(ckpt: Path, edit) -> None:
    """Edit the manifest and reseal its sidecar, as someone who hand-edits a checkpoint would."""
    data = json.loads((ckpt / MANIFEST_NAME).read_text())
    edit(data)
    raw = (json.dumps(data, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")


def rewrite_tau(ckpt: Path, edit) -> None:
    """Rewrite the τ* file with ``edit(tensors, metadata)`` applied (hashes left stale: the loader must refuse
    on what the bytes say, not only verify on their hash)."""
    with safe_open(str(ckpt / TAU_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys(), no iteration)
        metadata = dict(f.metadata())
    edit(tensors, metadata)
    save_file(tensors, str(ckpt / TAU_FILE), metadata=metadata)


def first_merged(ckpt: Path) -> str:
    return next(s["name"] for s in json.loads((ckpt / MANIFEST_NAME).read_text())["slots"] if s["merged"])


@pytest.mark.parametrize(
    ("value", "why"),
    [(0.0, "zero"), (-0.5, "negative"), (math.nan, "NaN"), (math.inf, "inf"), (3e38, "overflows ·qmax")],
)
def test_a_scale_no_writer_writes_is_refused_naming_the_tensor(merges, tmp_path, value, why):
    ckpt = copy_of(merges["int8"], tmp_path)
    name = first_merged(ckpt)

    def edit(tensors, metadata):
        tensors[name + quant.SCALES_SUFFIX].view(-1)[0] = value

    rewrite_tau(ckpt, edit)
    with mmer.load_decoupled(ckpt) as c, pytest.raises(DecoupledFormatError) as caught:
        c.llm_tensor("vision", name)
    assert caught.value.tensor == name + quant.SCALES_SUFFIX and "scale" in caught.value.message, why
    assert caught.value.hint and "re-run the merge" in caught.value.hint
    report = verify(ckpt)
    assert not report.ok and any(name in p and "scale" in p for p in report.problems)


def test_codes_outside_the_symmetric_range_or_a_set_padding_nibble_are_refused(merges, tmp_path):
    ckpt = copy_of(merges["int8"], tmp_path)
    name = first_merged(ckpt)
    rewrite_tau(ckpt, lambda t, m: t[name].view(-1).__setitem__(0, -128))
    with mmer.load_decoupled(ckpt) as c, pytest.raises(DecoupledFormatError, match="-128"):
        c.tau_star(name)
    codes, scales = quant.quantise_rows(torch.randn(3, 5), "int4", 2)  # odd rows: a pad nibble in each last byte
    codes[1, -1] |= 0x10
    with pytest.raises(DecoupledFormatError, match="padding nibble") as caught:
        quant.dequantise(codes, scales, (3, 5), "int4", 2, torch.float32, file="tau_star/x", tensor="t")
    assert caught.value.tensor == "t" and caught.value.file == "tau_star/x"


@pytest.mark.parametrize(
    "edit",
    [
        "codes-shape",
        "codes-dtype",
        "scales-shape",
        "scales-missing",
        "extra-tensor",
        "metadata-group-size",
        "metadata-scheme",
    ],
)
def test_a_tau_file_that_disagrees_with_the_manifest_is_refused_before_a_code_is_read(merges, tmp_path, edit):
    ckpt = copy_of(merges["int4"], tmp_path)
    name = first_merged(ckpt)

    def change(tensors, metadata):
        if edit == "codes-shape":
            tensors[name] = torch.cat([tensors[name], tensors[name][..., :1]], dim=-1)
        elif edit == "codes-dtype":
            tensors[name] = tensors[name].to(torch.int8)
        elif edit == "scales-shape":
            tensors[name + quant.SCALES_SUFFIX] = tensors[name + quant.SCALES_SUFFIX][..., :-1].contiguous()
        elif edit == "scales-missing":
            del tensors[name + quant.SCALES_SUFFIX]
        elif edit == "extra-tensor":
            tensors["lm_head.weight:codes"] = torch.zeros(2, dtype=torch.uint8)
        elif edit == "metadata-group-size":
            metadata["group_size"] = "6"
        else:
            metadata["scheme"] = "int8"

    rewrite_tau(ckpt, change)
    with mmer.load_decoupled(ckpt) as c, pytest.raises(DecoupledFormatError) as caught:
        c.tau_star(name)
    assert str(ckpt / "tau_star") in caught.value.message and caught.value.hint
    assert verify(ckpt).problems


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["tau_star_encoding"].update(scheme="int3"), "tau_star_encoding.scheme"),
        (lambda d: d["tau_star_encoding"].update(group_size=0), "tau_star_encoding.group_size"),
        (lambda d: d["tau_star_encoding"].update(group_size=-4), "tau_star_encoding.group_size"),
        (lambda d: d["tau_star_encoding"].update(group_size=True), "tau_star_encoding.group_size"),
        (lambda d: d["tau_star_encoding"].update(group_size=2.5), "tau_star_encoding.group_size"),
        (lambda d: d["tau_star_encoding"].update(group_size="5"), "tau_star_encoding.group_size"),
        (lambda d: d["tau_star_encoding"].update(group_size=1 << 40), "tau_star_encoding.group_size"),
        (lambda d: d["tau_star_encoding"].update(scale_dtype="BF16"), "tau_star_encoding.scale_dtype"),
        (lambda d: d["tau_star_encoding"].pop("scheme"), "tau_star_encoding.scheme"),
        (lambda d: d.update(tau_star_encoding=[]), "tau_star_encoding"),
        (lambda d: d.update(format_version="1.0"), "format_version"),
        (lambda d: d.update(tau_star_encoding=None), "format_version"),
    ],
)
def test_a_hostile_encoding_in_the_manifest_is_refused_naming_its_key(merges, tmp_path, edit, key):
    ckpt = copy_of(merges["int4"], tmp_path)
    edit_manifest(ckpt, edit)
    with pytest.raises(DecoupledFormatError) as caught:
        mmer.load_decoupled(ckpt)
    assert caught.value.key == key and MANIFEST_NAME in caught.value.message and caught.value.hint


def test_a_group_size_the_scales_were_not_made_with_is_refused(merges, tmp_path):
    # 5 → 4: the manifest still validates, but the scales' shapes (⌈cols/5⌉ groups) do not fit groups of 4
    ckpt = copy_of(merges["int4"], tmp_path)
    edit_manifest(ckpt, lambda d: d["tau_star_encoding"].update(group_size=4))
    with mmer.load_decoupled(ckpt) as c, pytest.raises(DecoupledFormatError, match="group"):
        c.tau_star(first_merged(ckpt))


def test_fuzzed_encodings_load_or_are_refused_never_crash(merges, tmp_path):
    rng = random.Random(20)
    values = [None, 0, 1, -1, 5, 7, 128, 1 << 20, (1 << 20) + 1, 2.0, "int4", "int8", "", [], {}, True, math.pi]
    keys = ["scheme", "group_size", "scale_dtype", "extra"]
    for i in range(40):
        ckpt = copy_of(merges["int4"], tmp_path / str(i))

        key, value = rng.choice(keys), rng.choice(values)
        edit_manifest(ckpt, lambda d, key=key, value=value: d["tau_star_encoding"].__setitem__(key, value))
        try:
            with mmer.load_decoupled(ckpt) as c:
                for slot in c.merged_slots:
                    c.tau_star(slot.name)
        except MmerError as err:
            assert err.hint, err.message
        shutil.rmtree(ckpt)


def test_a_reader_of_format_1_refuses_a_quantised_checkpoint_by_its_version(merges, monkeypatch):
    monkeypatch.setattr(manifest_module, "READABLE_MAJORS", ("1",))  # what an mmer before the encoding reads
    with pytest.raises(DecoupledFormatError, match=r"format_version 2\.0 is not readable") as caught:
        Manifest.read(merges["int4"])
    assert caught.value.key == "format_version" and caught.value.hint == "upgrade mmer"


# ---------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"tau_storage": "int2"}, "tau_storage"),
        ({"tau_storage": "int4", "tau_group_size": 0}, "tau_group_size"),
        ({"tau_storage": "int4", "tau_group_size": True}, "tau_group_size"),
        ({"tau_group_size": 64}, "tau_group_size"),  # a group size with an exact τ*: the user meant to quantise
        ({"tau_storage": "int8", "mask": "none"}, "tau_storage"),
    ],
)
def test_storage_options_that_cannot_mean_anything_are_refused(options, key):
    with pytest.raises(ConfigError) as caught:
        MergeOptions(**options)
    assert caught.value.key == key and caught.value.hint


def test_the_command_line_stores_tau_quantised(tiny_models, tmp_path):
    from cli_runner import cli

    specs = {}
    for name, path in (("base", tiny_models["base_dir"]), ("vision", tiny_models["vision_dir"])):
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(f"model: {path}\n" + ("" if name == "base" else "modality: vision\n"))
    out = tmp_path / "out"
    result = cli("merge", specs["base"], specs["vision"], "-o", out, "--tau-storage", "int4", "--tau-group-size", "8")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads((out / MANIFEST_NAME).read_text())["tau_star_encoding"]["group_size"] == 8
    assert verify(out).ok


@pytest.mark.parametrize("mode", ["exact", "standin"])
def test_adding_a_modality_to_a_quantised_checkpoint_keeps_its_storage(tiny_models, tmp_path, mode):
    from mmer.add import add_models
    from mmer.config import ModelSpec

    merged = tmp_path / "merged"
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, tau_storage="int8")
    mmer.run_merge(recipe, merged)
    out = tmp_path / "added"
    add_models(merged, [ModelSpec(str(tiny_models["audio_dir"]), modality="audio")], out, mode=mode)
    with mmer.load_decoupled(out) as ckpt:
        assert ckpt.tau_star_encoding is not None and ckpt.tau_star_encoding.scheme == "int8"
        assert ckpt.manifest.format_version == "2.0" and ckpt.modalities == ["vision", "audio"]
    assert verify(out).ok


def test_tune_recomputes_the_exact_tau_rather_than_reuse_a_quantised_one(merges):
    from mmer.tune.inputs import tune_inputs

    assert tune_inputs(None, merges["exact"], None, None, False)[2] is not None  # an exact τ* is reused
    assert tune_inputs(None, merges["int4"], None, None, False)[2] is None  # codes are never read as τ*


def test_the_dry_run_estimates_the_quantised_output_within_the_files_it_writes(tiny_models, merges):
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    for name, options in (("exact", {}), ("int4", {"tau_storage": "int4", "tau_group_size": 5})):
        plan = mmer.run_merge(recipe_for(tiny_models["base_dir"], models, **options), None, dry_run=True).plan
        written = sum(f.stat().st_size for f in (merges[name] / "tau_star").iterdir())
        if name == "exact":
            exact_estimate, exact_written = plan["estimate"]["output_bytes"], written
        else:  # the estimate drops by what τ*'s files shrink by, to within their headers
            drop = exact_estimate - plan["estimate"]["output_bytes"]
            assert abs(drop - (exact_written - written)) < 8192
