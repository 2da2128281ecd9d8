"""Layout detection from tensor names, canonical <-> on-disk names, and module classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmer.errors import LayoutError
from mmer.io.layouts import (
    CAUSAL_LM,
    HF_LEGACY,
    HF_NESTED,
    LAYOUTS,
    MODULE_TYPES,
    TEXT_MODEL,
    Layout,
    detect_layout,
    is_buffer_name,
    is_vocab_tensor,
    layer_index,
    module_type,
)
from mmer.io.reader import CheckpointReader

# ---------------------------------------------------------------------------------------- realistic names

LAYER_SUFFIXES = [
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]


def canonical_llm(n_layers: int = 2) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    names |= {f"model.layers.{i}.{s}" for i in range(n_layers) for s in LAYER_SUFFIXES}
    return names


def on_disk(layout: Layout, n_layers: int = 2) -> set[str]:
    return {layout.to_disk(c) for c in canonical_llm(n_layers)}


LLAVA_ORIGINAL = [
    "model.mm_projector.0.weight",
    "model.mm_projector.0.bias",
    "model.mm_projector.2.weight",
    "model.mm_projector.2.bias",
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
]
LLAVA_NEXT_ORIGINAL = LLAVA_ORIGINAL + ["model.image_newline"]
POINTLLM = [
    "model.point_proj.0.weight",
    "model.point_proj.0.bias",
    "model.point_proj.2.weight",
    "model.point_backbone.encoder.blocks.0.attn.qkv.weight",
    "model.point_backbone.cls_token",
]
QWEN2_VL = [
    "visual.patch_embed.proj.weight",
    "visual.blocks.0.norm1.weight",
    "visual.blocks.0.attn.qkv.weight",
    "visual.blocks.0.attn.proj.weight",
    "visual.blocks.0.mlp.fc1.weight",
    "visual.merger.ln_q.weight",
    "visual.merger.mlp.0.weight",
]
QWEN2_AUDIO = [
    "audio_tower.conv1.weight",
    "audio_tower.embed_positions.weight",
    "audio_tower.layers.0.self_attn.q_proj.weight",
    "audio_tower.layers.0.fc1.weight",
    "audio_tower.layer_norm.weight",
    "multi_modal_projector.linear.weight",
    "multi_modal_projector.linear.bias",
]
LLAVA_HF = [
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "vision_tower.vision_model.encoder.layers.0.layer_norm1.weight",
    "vision_tower.vision_model.post_layernorm.weight",
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.bias",
]
LLAVA_NEXT_HF = LLAVA_HF + ["image_newline"]
LLAVA_HF_NESTED = [
    "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "model.multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_2.bias",
    "model.image_newline",
]
QWEN2_VL_NESTED = ["model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight"]
IDEFICS3 = [
    "model.vision_model.embeddings.patch_embedding.weight",
    "model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "model.vision_model.post_layernorm.weight",
    "model.connector.modality_projection.proj.weight",
]

FAMILIES = [
    pytest.param(CAUSAL_LM, [], id="plain causal LM"),
    pytest.param(CAUSAL_LM, LLAVA_ORIGINAL, id="original LLaVA"),
    pytest.param(CAUSAL_LM, LLAVA_NEXT_ORIGINAL, id="original LLaVA-NeXT"),
    pytest.param(CAUSAL_LM, POINTLLM, id="PointLLM"),
    pytest.param(CAUSAL_LM, QWEN2_VL, id="Qwen2-VL"),
    pytest.param(HF_LEGACY, QWEN2_AUDIO, id="Qwen2-Audio"),
    pytest.param(HF_LEGACY, LLAVA_HF, id="llava-hf legacy"),
    pytest.param(HF_LEGACY, LLAVA_NEXT_HF, id="llava-next-hf legacy"),
    pytest.param(HF_NESTED, LLAVA_HF_NESTED, id="llava-hf nested"),
    pytest.param(HF_NESTED, QWEN2_VL_NESTED, id="Qwen2-VL nested"),
    pytest.param(TEXT_MODEL, IDEFICS3, id="Idefics3"),
]


@pytest.mark.parametrize("layout, components", FAMILIES)
def test_the_layout_is_detected_from_a_realistic_key_set(layout, components):
    keys = sorted(on_disk(layout) | set(components))
    assert detect_layout(keys, "ckpt") is layout
    assert detect_layout(set(keys), "ckpt") is layout


@pytest.mark.parametrize("layout, components", FAMILIES)
def test_component_keys_map_to_none_and_llm_keys_to_canonical_names(layout, components):
    for key in components:
        assert layout.to_canonical(key) is None, key
    assert {layout.to_canonical(k) for k in on_disk(layout)} == canonical_llm()


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_canonical_and_disk_names_round_trip_in_every_layout(layout):
    for canonical in canonical_llm(3) | {"model.layers.0.self_attn.rotary_emb.inv_freq"}:
        disk = layout.to_disk(canonical)
        assert layout.to_canonical(disk) == canonical
        assert layout.to_disk(layout.to_canonical(disk)) == disk


@pytest.mark.parametrize(
    "layout, canonical, disk",
    [
        (CAUSAL_LM, "model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
        (CAUSAL_LM, "lm_head.weight", "lm_head.weight"),
        (HF_LEGACY, "model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
        (HF_LEGACY, "lm_head.weight", "language_model.lm_head.weight"),
        (HF_NESTED, "model.norm.weight", "model.language_model.norm.weight"),
        (HF_NESTED, "lm_head.weight", "lm_head.weight"),
        (TEXT_MODEL, "model.layers.0.self_attn.q_proj.weight", "model.text_model.layers.0.self_attn.q_proj.weight"),
        (TEXT_MODEL, "lm_head.weight", "lm_head.weight"),
    ],
)
def test_to_disk_gives_the_exact_on_disk_name(layout, canonical, disk):
    assert layout.to_disk(canonical) == disk
    assert layout.to_canonical(disk) == canonical


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_to_disk_refuses_a_name_that_is_not_canonical(layout):
    with pytest.raises(ValueError):
        layout.to_disk("vision_tower.x.weight")


def test_layouts_are_registered_by_their_stable_names():
    assert LAYOUTS == {
        "causal_lm": CAUSAL_LM,
        "hf_legacy": HF_LEGACY,
        "hf_nested": HF_NESTED,
        "text_model": TEXT_MODEL,
    }


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "bad_key",
    [
        "model.language_model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.language_model.embed_tokens.weight",
        "model.language_model.visual.blocks.0.attn.qkv.weight",
        "language_model.language_model.model.layers.0.mlp.up_proj.weight",
    ],
)
def test_a_doubled_prefix_is_refused_as_a_broken_save(bad_key):
    keys = sorted(on_disk(HF_NESTED) | {bad_key})
    with pytest.raises(LayoutError) as info:
        detect_layout(keys, "/models/broken")
    err = info.value
    assert err.tensor == bad_key
    assert err.file == "/models/broken"
    assert bad_key in err.message and "/models/broken" in err.message
    assert err.hint and "transformers" in err.hint


@pytest.mark.parametrize(
    "first, second",
    [
        (CAUSAL_LM, HF_LEGACY),
        (CAUSAL_LM, HF_NESTED),
        (CAUSAL_LM, TEXT_MODEL),
        (HF_LEGACY, HF_NESTED),
        (HF_LEGACY, TEXT_MODEL),
        (HF_NESTED, TEXT_MODEL),
    ],
    ids=lambda lay: lay.name,
)
def test_keys_from_two_layouts_at_once_are_refused_naming_both_prefixes(first, second):
    keys = sorted(on_disk(first, 1) | on_disk(second, 1))
    with pytest.raises(LayoutError) as info:
        detect_layout(keys, "mixed")
    err = info.value
    assert err.file == "mixed"
    assert first.body_prefix in err.message and second.body_prefix in err.message
    assert err.hint


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([], id="no keys"),
        pytest.param(LLAVA_HF, id="vision tower and projector only"),
        pytest.param(
            [
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            ],
            id="LoRA adapter",
        ),
        pytest.param(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"], id="no decoder layers"),
        pytest.param(["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"], id="GPT-2 names"),
    ],
)
def test_no_decoder_at_all_is_refused_with_a_helpful_hint(keys):
    with pytest.raises(LayoutError) as info:
        detect_layout(keys, "/models/x")
    err = info.value
    assert err.file == "/models/x"
    assert "no LLM decoder layers" in err.message
    assert "model.layers.N" in err.message
    for key in sorted(keys)[:5]:
        assert key in err.message
    assert err.hint and "LoRA" in err.hint


# ----------------------------------------------------------------------------------------- classification

MODULES = [
    ("model.layers.0.self_attn.q_proj.weight", "q", 0),
    ("model.layers.0.self_attn.q_proj.bias", "q", 0),
    ("model.layers.1.self_attn.k_proj.weight", "k", 1),
    ("model.layers.2.self_attn.v_proj.weight", "v", 2),
    ("model.layers.3.self_attn.o_proj.weight", "o", 3),
    ("model.layers.10.mlp.gate_proj.weight", "gate", 10),
    ("model.layers.11.mlp.up_proj.weight", "up", 11),
    ("model.layers.12.mlp.down_proj.weight", "down", 12),
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "gate", 0),
    ("model.layers.0.block_sparse_moe.experts.3.w3.weight", "up", 0),
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", "down", 0),
    ("model.layers.0.mlp.experts.7.gate_proj.weight", "gate", 0),
    ("model.layers.0.block_sparse_moe.gate.weight", "other", 0),
    ("model.embed_tokens.weight", "embed", None),
    ("lm_head.weight", "lm_head", None),
    ("model.norm.weight", "norm", None),
    ("model.layers.5.input_layernorm.weight", "norm", 5),
    ("model.layers.5.post_attention_layernorm.weight", "norm", 5),
    ("model.layers.5.self_attn.q_norm.weight", "norm", 5),
    ("model.layers.5.self_attn.k_norm.weight", "norm", 5),
    ("model.layers.5.self_attn.rotary_emb.inv_freq", "other", 5),
]


@pytest.mark.parametrize("canonical, expected_type, expected_layer", MODULES, ids=[m[0] for m in MODULES])
def test_module_type_and_layer_index_classify_canonical_names(canonical, expected_type, expected_layer):
    assert module_type(canonical) == expected_type
    assert expected_type in MODULE_TYPES
    assert layer_index(canonical) == expected_layer


@pytest.mark.parametrize(
    "canonical, vocab, buffer",
    [
        ("model.embed_tokens.weight", True, False),
        ("lm_head.weight", True, False),
        ("model.norm.weight", False, False),
        ("model.layers.0.mlp.up_proj.weight", False, False),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", False, True),
    ],
)
def test_vocab_tensors_and_buffers_are_recognised(canonical, vocab, buffer):
    assert is_vocab_tensor(canonical) is vocab
    assert is_buffer_name(canonical) is buffer


# ---------------------------------------------------------------------------- real transformers models


def _text_configs():
    import transformers

    common = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return {"qwen2": transformers.Qwen2Config(**common), "llama": transformers.LlamaConfig(**common)}


def _build_models():
    """(name, model, the plain causal LM with the same text config, acceptable layouts, component prefixes)."""
    import transformers as T

    text = _text_configs()
    causal = {"qwen2": T.Qwen2ForCausalLM, "llama": T.LlamaForCausalLM}
    clip = T.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    built = {}
    for kind in ("qwen2", "llama"):
        config = T.LlavaConfig(text_config=text[kind], vision_config=clip, image_token_index=95)
        built[f"llava-{kind}"] = (
            T.LlavaForConditionalGeneration(config),
            kind,
            # transformers <=4.51 and >=5.2 save llava-hf as hf_legacy, 4.52.0-4.52.3 (and some 5.x) as hf_nested
            {"hf_legacy", "hf_nested"},
            ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
        )
    audio = T.Qwen2AudioEncoderConfig(
        d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
        max_source_positions=16,
    )  # fmt: skip
    built["qwen2-audio"] = (
        T.Qwen2AudioForConditionalGeneration(
            T.Qwen2AudioConfig(audio_config=audio, text_config=text["qwen2"], audio_token_index=95)
        ),
        "qwen2",
        {"hf_legacy", "hf_nested"},
        ("audio_tower.", "multi_modal_projector.", "model.audio_tower.", "model.multi_modal_projector."),
    )
    try:
        vision = T.Idefics3VisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14,
        )  # fmt: skip
        idefics = T.Idefics3ForConditionalGeneration(
            T.Idefics3Config(vision_config=vision, text_config=text["llama"], image_token_id=95, scale_factor=1)
        )
        built["idefics3"] = (idefics, "llama", {"text_model"}, ("model.vision_model.", "model.connector."))
    except Exception:  # pragma: no cover - older/newer transformers may not build it with these dims
        pass
    for kind in ("qwen2", "llama"):
        built[f"{kind}-causal-lm"] = (causal[kind](text[kind]), kind, {"causal_lm"}, ())
    plain = {kind: causal[kind](text[kind]) for kind in causal}
    return built, plain


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """Tiny real models saved with save_pretrained: name -> (dir, plain causal-LM dir, layouts, component prefixes)."""
    pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    built, plain = _build_models()
    root = tmp_path_factory.mktemp("hf-models")
    plain_dirs = {}
    for kind, model in plain.items():
        plain_dirs[kind] = root / f"plain-{kind}"
        model.save_pretrained(plain_dirs[kind])
    out = {}
    for name, (model, kind, layouts, prefixes) in built.items():
        model.save_pretrained(root / name)
        out[name] = (root / name, plain_dirs[kind], layouts, prefixes)
    return out


REAL_MODELS = ["llava-qwen2", "llava-llama", "qwen2-audio", "idefics3", "qwen2-causal-lm", "llama-causal-lm"]


def _keys(directory: Path) -> list[str]:
    with CheckpointReader(directory) as reader:
        return sorted(reader.tensors)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_a_saved_transformers_model_is_detected_and_its_llm_matches_the_plain_causal_lm(saved_models, name):
    if name not in saved_models:
        pytest.skip(f"{name} does not build with this transformers version")
    directory, plain_dir, layouts, prefixes = saved_models[name]
    keys = _keys(directory)
    layout = detect_layout(keys, str(directory))
    assert layout.name in layouts

    canonical = {layout.to_canonical(k) for k in keys} - {None}
    plain_keys = _keys(plain_dir)
    assert detect_layout(plain_keys, str(plain_dir)) is CAUSAL_LM
    assert canonical == {CAUSAL_LM.to_canonical(k) for k in plain_keys} == set(plain_keys)

    components = [k for k in keys if layout.to_canonical(k) is None]
    assert all(k.startswith(prefixes) for k in components), components
    assert bool(components) == bool(prefixes)
    for key in keys:
        c = layout.to_canonical(key)
        if c is not None:
            assert layout.to_disk(c) == key
