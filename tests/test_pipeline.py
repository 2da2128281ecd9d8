"""The streaming merge equals a plain in-memory MMER, through every layout and file format, and refuses bad input
without leaving anything behind."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, base_state, component_state, finetune_state, write_model
from safetensors.torch import load_file, save_file

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.errors import (
    CheckpointFormatError,
    ConfigError,
    IncompatibleBaseError,
    LayoutError,
    NonFiniteError,
    OutputExistsError,
)
from mmer.synthetic import TINY_LLAMA


def recipe_for(base: Path, models: dict[str, Path], **options) -> Recipe:
    return Recipe(
        ModelSpec(str(base)),
        tuple(ModelSpec(str(p), modality=m) for m, p in models.items()),
        MergeOptions(**{"hash_inputs": False, **options}),
    )


def reference_mmer(
    base: dict[str, torch.Tensor],
    models: dict[str, dict[str, torch.Tensor]],
    k: float = 0.8,
    lam: float = 0.9,
    trim_scope: str = "global",
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """MMER written the obvious way, whole model in memory: flatten, global kthvalue, TIES, Eq. 3."""
    names = list(base)
    rows = {n: base[n].shape[0] for n in names}
    taus = {m: {n: s[n][: rows[n]].float() - base[n].float() for n in names} for m, s in models.items()}

    def trimmed(tau: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if k >= 1:
            return tau
        if trim_scope == "global":
            flat = torch.cat([t.reshape(-1) for t in tau.values()]).abs()
            d = flat.numel()
            thr = flat.kthvalue(d - int(d * k)).values
            return {n: t * (t.abs() >= thr) for n, t in tau.items()}
        out = {}
        for n, t in tau.items():
            d = t.numel()
            thr = t.abs().reshape(-1).kthvalue(d - int(d * k)).values
            out[n] = t * (t.abs() >= thr)
        return out

    trims = {m: trimmed(t) for m, t in taus.items()}
    tau_star, masks = {}, {m: {} for m in models}
    for n in names:
        stack = torch.stack([trims[m][n] for m in models])
        gamma = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == gamma) & (stack != 0)
        merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        stored = merged.to(base[n].dtype).float()
        tau_star[n] = merged.to(base[n].dtype)
        for m in models:
            t = trims[m][n]
            masks[m][n] = (torch.sign(t) == torch.sign(stored)) & (stored != 0) & (t.abs() >= lam * 0.5 * stored.abs())
    return tau_star, masks


def assert_matches_reference(out: Path, tiny_models, **kwargs) -> None:
    tau_ref, masks_ref = reference_mmer(
        tiny_models["base"], {"vision": tiny_models["vision"], "audio": tiny_models["audio"]}, **kwargs
    )
    with mmer.load_decoupled(out) as ckpt:
        for name, expected in tau_ref.items():
            assert torch.equal(ckpt.tau_star(name), expected), name
            for modality in ("vision", "audio"):
                assert torch.equal(ckpt.mask(modality, name), masks_ref[modality][name]), (modality, name)


def test_streaming_merge_equals_an_in_memory_mmer_with_global_trim(tiny_models, tmp_path):
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    mmer.run_merge(recipe, tmp_path / "out")
    assert_matches_reference(tmp_path / "out", tiny_models)


@pytest.mark.parametrize("k,lam", [(0.8, 0.9), (0.2, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_streaming_merge_equals_an_in_memory_mmer_with_per_tensor_trim(tiny_models, tmp_path, k, lam):
    recipe = recipe_for(
        tiny_models["base_dir"],
        {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]},
        trim_scope="per-tensor",
        k=k,
        lambda_=lam,
    )
    mmer.run_merge(recipe, tmp_path / "out")
    assert_matches_reference(tmp_path / "out", tiny_models, k=k, lam=lam, trim_scope="per-tensor")


LAYOUT_CASES = [
    ("causal_lm", "safetensors", 1, "model.mm_projector."),
    ("causal_lm", "bin", 2, "model.mm_projector."),
    ("hf_legacy", "safetensors", 3, "multi_modal_projector."),
    ("hf_legacy", "bin", 1, "multi_modal_projector."),
    ("hf_nested", "safetensors", 2, "model.multi_modal_projector."),
    ("text_model", "safetensors", 1, "model.connector."),
]


@pytest.mark.parametrize("layout,fmt,shards,component_prefix", LAYOUT_CASES)
def test_the_same_fine_tune_in_every_layout_gives_the_same_tau_star_and_masks(
    tiny_models, tmp_path, layout, fmt, shards, component_prefix
):
    components = component_state(11, prefix=component_prefix)
    vision_dir = write_model(tmp_path / "vision", tiny_models["vision"], layout, components, fmt, shards)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": vision_dir, "audio": tiny_models["audio_dir"]})
    mmer.run_merge(recipe, tmp_path / "out")
    assert_matches_reference(tmp_path / "out", tiny_models)
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        record = ckpt.modality("vision")
        assert record.source.layout == layout
        assert sorted(record.component_tensors) == sorted(components)
        reader = ckpt.component_reader("vision")
        for name, tensor in components.items():
            assert torch.equal(reader.get(name), tensor)


def test_every_tensor_of_the_decoupled_checkpoint_reads_back_as_written(tiny_models, tmp_path):
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    report = mmer.run_merge(recipe, tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert ckpt.modalities == ["vision", "audio"]
        for name, tensor in tiny_models["base"].items():
            assert torch.equal(ckpt.base_tensor(name), tensor)
        # private vocabulary rows: vision appended 2 rows, audio 1, kept verbatim with their component
        for modality, extra in (("vision", 2), ("audio", 1)):
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                private = ckpt.private_tensor(modality, name)
                assert torch.equal(private, tiny_models[modality][name][VOCAB:])
                assert private.shape[0] == extra
            assert ckpt.modality(modality).vocab_size == VOCAB + extra
        # llm_tensor rebuilds θ_base + m∘τ* and appends the private rows
        embed = ckpt.llm_tensor("vision", "model.embed_tokens.weight")
        assert embed.shape[0] == VOCAB + 2
        expected = tiny_models["base"]["model.embed_tokens.weight"] + torch.where(
            ckpt.mask("vision", "model.embed_tokens.weight"), ckpt.tau_star("model.embed_tokens.weight"), 0.0
        )
        assert torch.equal(embed[:VOCAB], expected)
        # density in the manifest = set bits of the mask files
        for m in report.modalities:
            record = ckpt.modality(m.name)
            assert record.kept == sum(int(ckpt.mask(m.name, n).sum()) for n in tiny_models["base"])
            assert record.kept == sum(record.kept_per_tensor.values())
            assert 0 < record.density < 1
    manifest = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())
    assert manifest["format_version"] == "1.0"
    assert set(manifest["files"]) >= {"tau_star/model.safetensors", "masks/vision.safetensors", "README.md"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "tags:" in card and "vision" in card
    assert (tmp_path / "out" / "components" / "vision" / "tokenizer_config.json").is_file()


def test_one_model_without_trim_and_lambda_zero_reproduces_itself(tiny_models, tmp_path):
    """Identity: τ* = τ, the mask is 1 exactly where τ ≠ 0, and θ_base + m∘τ* ≈ θ (one float rounding)."""
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, k=1.0, lambda_=0.0)
    mmer.run_merge(recipe, tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        for name, base in tiny_models["base"].items():
            tau = tiny_models["vision"][name][: base.shape[0]] - base
            assert torch.equal(ckpt.tau_star(name), tau)
            assert torch.equal(ckpt.mask("vision", name), tau != 0)
            torch.testing.assert_close(ckpt.llm_tensor("vision", name), tiny_models["vision"][name], rtol=0, atol=1e-7)


def test_the_same_inputs_give_bit_identical_files_across_runs_and_shard_sizes(tiny_models, tmp_path):
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    a = mmer.run_merge(recipe_for(tiny_models["base_dir"], models), tmp_path / "a")
    b = mmer.run_merge(recipe_for(tiny_models["base_dir"], models), tmp_path / "b")
    files_a = json.loads((tmp_path / "a" / "mmer_manifest.json").read_text())["files"]
    files_b = json.loads((tmp_path / "b" / "mmer_manifest.json").read_text())["files"]
    assert files_a == files_b
    assert [m.to_dict() for m in a.modalities] == [m.to_dict() for m in b.modalities]
    mmer.run_merge(recipe_for(tiny_models["base_dir"], models, shard_size=4096), tmp_path / "c")
    assert len(list((tmp_path / "c" / "tau_star").glob("model-*.safetensors"))) > 1
    with mmer.load_decoupled(tmp_path / "a") as one, mmer.load_decoupled(tmp_path / "c") as other:
        for name in tiny_models["base"]:
            assert torch.equal(one.tau_star(name), other.tau_star(name))
    assert (tmp_path / "c" / "masks" / "vision.safetensors").read_bytes() == (
        tmp_path / "a" / "masks" / "vision.safetensors"
    ).read_bytes()


CHUNK_CASES = [
    {},
    {"mask": "tall"},
    {"mask": "none"},
    {"method": "average"},
    {"method": "task_arithmetic", "mask": "none", "delta_dtype": "float32"},
    {"method": "emr", "mask": "emr"},
    {"dare": 0.3},
    {"trim_scope": "per-tensor"},
    {"k": 0.3, "trim_count": "exact", "zero_sign": "positive", "aggregate": "sum"},
    {"zero_sign": "majority", "mask": "sign_only"},
    {"zero_sign": "majority", "dare": 0.3, "mask": "magnitude_only"},
]


@pytest.mark.parametrize("options", CHUNK_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_merging_slots_in_small_chunks_writes_the_same_bytes_as_whole_slots(
    tiny_models, tmp_path, monkeypatch, options
):
    """Chunking is an implementation detail: every weight, mask and count is identical to whole-slot merging."""
    import mmer.runtime as runtime

    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    recipe = recipe_for(tiny_models["base_dir"], models, **options)
    monkeypatch.setattr(runtime, "CPU_CHUNK", 1 << 40)
    whole = mmer.run_merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(runtime, "CPU_CHUNK", 24)  # a multiple of 8 that splits every tensor, leaving ragged tails
    chunked = mmer.run_merge(recipe, tmp_path / "chunked")
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(tmp_path / "chunked") for p in (tmp_path / "chunked").rglob("*.safetensors"))
    for rel in files:
        assert (tmp_path / "whole" / rel).read_bytes() == (tmp_path / "chunked" / rel).read_bytes(), rel
    assert [(m.name, m.kept, m.total) for m in whole.modalities] == [
        (m.name, m.kept, m.total) for m in chunked.modalities
    ]


def test_a_global_threshold_of_zero_is_reported_because_the_trim_then_removes_nothing(tiny_models, tmp_path):
    """audio's τ is 70 % exact zeros: a global top-80 % keeps every moved entry, and the user is told why."""
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    report = mmer.run_merge(recipe_for(tiny_models["base_dir"], models), tmp_path / "g")
    audio = next(m for m in report.modalities if m.name == "audio")
    assert audio.threshold == 0.0
    assert any(w.startswith("audio: the global trim threshold is 0") for w in report.warnings)
    per_tensor = mmer.run_merge(recipe_for(tiny_models["base_dir"], models, trim_scope="per-tensor"), tmp_path / "t")
    assert not any("trim threshold" in w for w in per_tensor.warnings)


FUSED_CASES = [
    {},
    {"zero_sign": "positive"},
    {"k": 1.0},
    {"delta_dtype": "float32"},
    {"alpha": 0.8, "lambda_": 1.3},
    {"zero_sign": "majority"},
    {"mask": "sign_only"},
    {"mask": "magnitude_only", "lambda_": 0.5},
]


@pytest.mark.parametrize("options", FUSED_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_fused_kernel_writes_the_same_bytes_as_the_eager_engine(tmp_path, monkeypatch, options, dtype):
    """Half-precision models (the kernel's case), one with appended vocabulary rows and two shards, one in .bin:
    every weight and mask file is identical with MMER_FUSED=0 (the eager engine) and without (the kernel)."""
    pytest.importorskip("numba")
    import mmer.runtime as runtime
    from mmer.merge import one_pass

    base = base_state(dtype=dtype)
    vision = finetune_state(base, seed=1, density=0.9, extra_rows=2)
    audio = finetune_state(base, seed=2, density=0.7)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "vision", vision, "hf_legacy", shards=2)
    write_model(tmp_path / "audio", audio, fmt="bin")
    recipe = recipe_for(tmp_path / "base", {"vision": tmp_path / "vision", "audio": tmp_path / "audio"}, **options)
    monkeypatch.setattr(runtime, "CPU_CHUNK", 40)
    calls = []
    real = one_pass.merge_chunk
    monkeypatch.setattr(one_pass, "merge_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs, used = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MMER_FUSED", flag)
        one_pass._kernel.cache_clear()
        calls.clear()
        outs[flag] = mmer.run_merge(recipe, tmp_path / f"out{flag}")
        used[flag] = len(calls)
    one_pass._kernel.cache_clear()
    assert used["1"] > 0 and used["0"] == 0  # the kernel really ran, and really did not
    files = sorted(p.relative_to(tmp_path / "out1") for p in (tmp_path / "out1").rglob("*.safetensors"))
    assert files
    for rel in files:
        assert (tmp_path / "out1" / rel).read_bytes() == (tmp_path / "out0" / rel).read_bytes(), rel
    assert [(m.name, m.kept) for m in outs["1"].modalities] == [(m.name, m.kept) for m in outs["0"].modalities]


def test_half_precision_inputs_store_tau_star_in_the_base_dtype_and_masks_follow_the_stored_values(tmp_path):
    base = base_state(dtype=torch.bfloat16)
    vision = finetune_state(base, seed=1)
    audio = finetune_state(base, seed=2)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "vision", vision, "hf_legacy")
    write_model(tmp_path / "audio", audio, "hf_legacy")
    recipe = recipe_for(tmp_path / "base", {"vision": tmp_path / "vision", "audio": tmp_path / "audio"})
    mmer.run_merge(recipe, tmp_path / "out")
    tau_ref, masks_ref = reference_mmer(base, {"vision": vision, "audio": audio})
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        for name in base:
            assert ckpt.tau_star(name).dtype == torch.bfloat16
            assert torch.equal(ckpt.tau_star(name), tau_ref[name])
            assert torch.equal(ckpt.mask("vision", name), masks_ref["vision"][name])
    mmer.run_merge(replace(recipe, options=replace(recipe.options, delta_dtype="float32")), tmp_path / "f32")
    with mmer.load_decoupled(tmp_path / "f32") as ckpt:
        assert ckpt.tau_star("lm_head.weight").dtype == torch.float32


def test_base_stored_by_reference_reads_the_same_weights(tiny_models, tmp_path):
    models = {"vision": tiny_models["vision_dir"]}
    mmer.run_merge(recipe_for(tiny_models["base_dir"], models, base_storage="reference"), tmp_path / "ref")
    assert not (tmp_path / "ref" / "base").exists()
    with mmer.load_decoupled(tmp_path / "ref") as ckpt:
        name = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(ckpt.base_tensor(name), tiny_models["base"][name])


def test_vocab_policy_exclude_keeps_each_models_own_embeddings(tiny_models, tmp_path):
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    mmer.run_merge(recipe_for(tiny_models["base_dir"], models, vocab_policy="exclude"), tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        unmerged = {s.name: s.reason for s in ckpt.slots if not s.merged}
        assert unmerged == {
            "model.embed_tokens.weight": "vocab_policy=exclude",
            "lm_head.weight": "vocab_policy=exclude",
        }
        assert torch.equal(ckpt.llm_tensor("audio", "lm_head.weight"), tiny_models["audio"]["lm_head.weight"])


def test_vocab_policy_strict_refuses_added_rows(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, vocab_policy="strict")
    with pytest.raises(IncompatibleBaseError, match="embed_tokens") as info:
        mmer.run_merge(recipe, tmp_path / "out")
    assert "shared-rows" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_and_estimates_without_writing(tiny_models, tmp_path):
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    report = mmer.run_merge(recipe, tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists()
    plan = report.plan
    assert plan["slots"]["merged"] == len(tiny_models["base"])
    assert plan["estimate"]["peak_bytes"] > 0
    assert plan["models"][0]["private_tensors"] == ["model.embed_tokens.weight", "lm_head.weight"]


# ------------------------------------------------------------------------------------------------ bad input
def _no_leftovers(parent: Path) -> None:
    assert not (parent / "out").exists()
    assert not [p for p in parent.iterdir() if "mmer-staging" in p.name]


def _shape_mismatch(tiny_models, d: Path) -> Path:
    state = dict(tiny_models["vision"])
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :-1]
    return write_model(d / "bad", state, "hf_legacy")


def _config_mismatch(tiny_models, d: Path) -> Path:
    return write_model(d / "bad", tiny_models["vision"], "causal_lm", config={**TINY_LLAMA, "rms_norm_eps": 1e-6})


def _missing_lm_head(tiny_models, d: Path) -> Path:
    state = {k: v for k, v in tiny_models["vision"].items() if k != "lm_head.weight"}
    return write_model(d / "bad", state, "hf_legacy")


def _extra_layer(tiny_models, d: Path) -> Path:
    state = dict(tiny_models["vision"])
    state["model.layers.2.input_layernorm.weight"] = torch.ones(16)
    return write_model(d / "bad", state, "hf_legacy")


def _fewer_rows(tiny_models, d: Path) -> Path:
    state = dict(tiny_models["vision"])
    state["lm_head.weight"] = state["lm_head.weight"][: VOCAB - 1]
    return write_model(d / "bad", state, "hf_legacy")


def _nan(tiny_models, d: Path) -> Path:
    state = dict(tiny_models["vision"])
    t = state["model.layers.0.self_attn.q_proj.weight"].clone()
    t[0, 0] = float("nan")
    state["model.layers.0.self_attn.q_proj.weight"] = t
    return write_model(d / "bad", state, "hf_legacy")


def _missing_shard(tiny_models, d: Path) -> Path:
    path = write_model(d / "bad", tiny_models["vision"], "hf_legacy", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    return path


def _truncated(tiny_models, d: Path) -> Path:
    path = write_model(d / "bad", tiny_models["vision"], "hf_legacy")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def _no_decoder(tiny_models, d: Path) -> Path:
    (d / "bad").mkdir()
    save_file({"vision_tower.weight": torch.ones(2)}, str(d / "bad" / "model.safetensors"))
    return d / "bad"


BAD_MODELS = [
    (_shape_mismatch, IncompatibleBaseError, "down_proj"),
    (_config_mismatch, IncompatibleBaseError, "rms_norm_eps"),
    (_missing_lm_head, IncompatibleBaseError, "lm_head"),
    (_extra_layer, IncompatibleBaseError, "layers.2"),
    (_fewer_rows, IncompatibleBaseError, "lm_head"),
    (_nan, NonFiniteError, "q_proj"),
    (_missing_shard, CheckpointFormatError, "model-00002-of-00002"),
    (_truncated, CheckpointFormatError, "model.safetensors"),
    (_no_decoder, LayoutError, "no LLM decoder"),
]


@pytest.mark.parametrize("build,error,fragment", BAD_MODELS, ids=[b[0].__name__.strip("_") for b in BAD_MODELS])
def test_a_bad_model_is_refused_by_name_and_leaves_no_output(tiny_models, tmp_path, build, error, fragment):
    bad = build(tiny_models, tmp_path)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": bad, "audio": tiny_models["audio_dir"]})
    with pytest.raises(error, match=fragment) as info:
        mmer.run_merge(recipe, tmp_path / "out")
    assert info.value.hint
    _no_leftovers(tmp_path)


def test_nan_is_merged_when_explicitly_allowed(tiny_models, tmp_path):
    bad = _nan(tiny_models, tmp_path)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": bad}, allow_nonfinite=True, k=1.0)
    mmer.run_merge(recipe, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())["options"]["allow_nonfinite"] is True


def test_a_base_holding_multimodal_tensors_is_refused(tiny_models, tmp_path):
    base = write_model(tmp_path / "base", tiny_models["base"], "hf_legacy", component_state(1))
    with pytest.raises(LayoutError, match="not part of an LLM"):
        mmer.run_merge(recipe_for(base, {"vision": tiny_models["vision_dir"]}), tmp_path / "out")
    _no_leftovers(tmp_path)


def test_an_existing_output_is_refused_unless_overwrite_and_only_mmers_own_is_replaced(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]})
    mmer.run_merge(recipe, tmp_path / "out")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        mmer.run_merge(recipe, tmp_path / "out")
    mmer.run_merge(recipe, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "mmer_manifest.json").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not an mmer output"):
        mmer.run_merge(recipe, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"


def test_an_interrupt_mid_merge_leaves_no_output(tiny_models, tmp_path, monkeypatch):
    import mmer.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_component", interrupted)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]})
    with pytest.raises(KeyboardInterrupt):
        mmer.run_merge(recipe, tmp_path / "out")
    _no_leftovers(tmp_path)


def test_unknown_method_is_refused_before_reading_weights(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, method="tie")
    with pytest.raises(ConfigError, match="unknown merge method"):
        mmer.run_merge(recipe, tmp_path / "out")


def test_real_transformers_models_rebuild_as_the_formula_says(demo_models, tmp_path):
    """Demo: llava-hf and Qwen2-Audio saved by transformers; θ̂ = θ_base + m∘τ* for every LLM tensor."""
    recipe = mmer.config.build_recipe(list(demo_models.specs))
    mmer.run_merge(recipe, tmp_path / "out")
    base = load_file(str(demo_models.base / "model.safetensors"))
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert ckpt.modality("vision").source.layout == "hf_legacy"
        assert ckpt.modality("audio").lambda_ == 0.8
        for name in ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight"):
            rebuilt = ckpt.llm_tensor("vision", name)
            expected = base[name] + torch.where(ckpt.mask("vision", name), ckpt.tau_star(name), 0.0)
            assert torch.equal(rebuilt[: base[name].shape[0]], expected)
        assert any(n.startswith("vision_tower.") for n in ckpt.modality("vision").component_tensors)
        assert any(n.startswith("audio_tower.") for n in ckpt.modality("audio").component_tensors)


def test_tied_embeddings_on_both_sides_merge_without_an_lm_head(tiny_models, tmp_path):
    tied = {**TINY_LLAMA, "tie_word_embeddings": True}
    base = {k: v for k, v in tiny_models["base"].items() if k != "lm_head.weight"}
    vision = {k: v for k, v in tiny_models["vision"].items() if k != "lm_head.weight"}
    write_model(tmp_path / "base", base, config=tied)
    write_model(tmp_path / "vision", vision, config=tied)
    mmer.run_merge(recipe_for(tmp_path / "base", {"vision": tmp_path / "vision"}), tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert "lm_head.weight" not in {s.name for s in ckpt.slots}


def test_the_written_recipe_pins_local_paths_so_it_reruns_from_anywhere(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_models["root"])
    recipe = Recipe(ModelSpec("base"), (ModelSpec("vision", modality="vision"),), MergeOptions(hash_inputs=False))
    mmer.run_merge(recipe, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    base, models, options = mmer.load_recipe(tmp_path / "out" / "mmer_recipe.yaml")
    assert Path(base.model).is_absolute() and Path(models[0].model).is_absolute()
    mmer.run_merge(Recipe(base, models, options), tmp_path / "again")
    first = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())["files"]
    second = json.loads((tmp_path / "again" / "mmer_manifest.json").read_text())["files"]
    assert first["tau_star/model.safetensors"] == second["tau_star/model.safetensors"]
    assert first["masks/vision.safetensors"] == second["masks/vision.safetensors"]


def test_hub_ids_resolve_offline_and_the_output_records_their_commits(tiny_models, tmp_path, hf_cache):
    from conftest import cache_model

    commit = "1" * 40
    cache_model(hf_cache, "org/tiny-base", tiny_models["base_dir"], commit)
    cache_model(hf_cache, "org/tiny-vision", tiny_models["vision_dir"], "2" * 40)
    recipe = Recipe(
        ModelSpec("org/tiny-base"), (ModelSpec("org/tiny-vision", revision="main", modality="vision"),), MergeOptions()
    )
    mmer.run_merge(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())
    assert manifest["base"]["model"] == "org/tiny-base" and manifest["base"]["commit"] == commit
    # Hub-cache blobs are named by their sha256: recorded without re-reading the file
    expected = hashlib.sha256((tiny_models["base_dir"] / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["base"]["files"]["model.safetensors"] == expected
    assert manifest["modalities"]["vision"]["source"]["commit"] == "2" * 40
    base, models, _ = mmer.load_recipe(tmp_path / "out" / "mmer_recipe.yaml")
    assert base.revision == commit and models[0].revision == "2" * 40
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- org/tiny-base\n- org/tiny-vision\n" in card  # base_model: every merged model, by Hub id


def test_an_unknown_hub_id_offline_is_refused_with_a_hint(tiny_models, tmp_path, hf_cache):
    from mmer.errors import ModelNotFoundError

    recipe = Recipe(ModelSpec("org/nowhere"), (ModelSpec(str(tiny_models["vision_dir"]), modality="vision"),))
    with pytest.raises(ModelNotFoundError, match="org/nowhere") as info:
        mmer.run_merge(recipe, tmp_path / "out")
    assert "HF_HUB_OFFLINE" in info.value.hint
    _no_leftovers(tmp_path)


def test_a_threshold_window_that_misses_falls_back_to_the_exact_two_pass_search(tiny_models, tmp_path, monkeypatch):
    import importlib

    trim = importlib.import_module("mmer.merge.trim")  # the module (mmer.merge re-exports a function `trim`)

    def wrong_window(self):
        self._samples.clear()
        self._lo, self._hi = 0, 3  # only denormal magnitudes: the k-th value is never in here

    monkeypatch.setattr(trim.WindowedThreshold, "open_window", wrong_window)
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    mmer.run_merge(recipe, tmp_path / "out")
    assert_matches_reference(tmp_path / "out", tiny_models)
