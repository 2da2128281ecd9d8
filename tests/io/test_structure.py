"""Where no name layout holds the LLM, transformers' own model structure places it (mmer/io/structure.py).

ShieldGemma 2 is the specimen: a classifier wrapping a whole Gemma 3 VLM, which its published checkpoints save
as ``model.model.language_model.model.layers.N`` with the head at ``model.lm_head``: no name layout reads that,
and transformers' structure (the wrapped model's decoder and head, the family's checkpoint conversion mapping)
does, without running anything from the checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mmer.errors import LayoutError
from mmer.io.layouts import LAYOUTS, detect_layout, layout_named, structure_layout
from mmer.io.structure import NotFound, find_llm

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ShieldGemma2ForImageClassification"):
    pytest.skip("this transformers has no ShieldGemma 2", allow_module_level=True)

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    layer_types=["sliding_attention", "full_attention"],
)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)


@pytest.fixture(scope="module")
def shieldgemma(tmp_path_factory):
    """A tiny ShieldGemma 2 saved by transformers: its tensor names and its config.json."""
    config = transformers.ShieldGemma2Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("shieldgemma2")
    transformers.ShieldGemma2ForImageClassification(config).save_pretrained(directory)
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    return keys, json.loads((directory / "config.json").read_text())


def test_a_wrapped_vlm_s_llm_is_found_through_transformers_structure(shieldgemma):
    keys, config = shieldgemma
    assert any(k.startswith("model.model.language_model.model.layers.") for k in keys)
    body, head, whitelist = find_llm(keys, config)
    assert (body, head, whitelist) == ("model.model.language_model.model.", "model.lm_head.", False)
    layout = detect_layout(keys, "shieldgemma2", config)
    assert layout.to_canonical("model.model.language_model.model.layers.1.mlp.up_proj.weight") == (
        "model.layers.1.mlp.up_proj.weight"
    )
    assert layout.to_canonical("model.lm_head.weight") == "lm_head.weight"
    assert layout.to_canonical("model.model.vision_tower.vision_model.post_layernorm.weight") is None


def test_without_its_config_the_same_checkpoint_is_refused_by_name(shieldgemma):
    keys, _ = shieldgemma
    with pytest.raises(LayoutError, match="no LLM decoder layers found"):
        detect_layout(keys, "shieldgemma2")


def test_a_structure_layout_s_name_carries_its_prefixes_so_a_manifest_reads_it_back_without_transformers():
    layout = structure_layout("thinker.model.", "thinker.lm_head.", whitelist=False)
    assert layout.name == "structure:thinker.model.|thinker.lm_head."
    assert layout_named(layout.name) == layout
    assert layout_named("structure:a.|b.|canonical").whitelist is True
    assert all(layout_named(name) is LAYOUTS[name] for name in LAYOUTS)
    for bad in ("structure:a|b.", "structure:a.|b.|x", "structure:../a.|b.", "nested", "structure:a.", ""):
        assert layout_named(bad) is None


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"model_type": "no_such_family"}, "not a transformers family"),
        ({}, "not a transformers family"),
        (
            {"model_type": "whisper", "d_model": 16, "encoder_attention_heads": 2, "decoder_attention_heads": 2},
            "an encoder-decoder",
        ),
    ],
)
def test_what_transformers_cannot_place_is_refused_with_the_reason(config, said):
    with pytest.raises(NotFound, match=said):
        find_llm({"x.layers.0.weight"}, config)


def test_remote_code_named_by_the_config_is_never_followed(shieldgemma):
    """``auto_map`` and an ``architectures`` entry that transformers does not register for the model_type choose
    nothing: only transformers' own classes for that family are built."""
    keys, config = shieldgemma
    named = ["evil.Model", "LlamaForCausalLM", *config["architectures"]]
    hostile = {**config, "auto_map": {"AutoModel": "evil.Model"}, "architectures": named}
    assert find_llm(keys, hostile) == find_llm(keys, config)


def test_a_config_claiming_more_layers_than_its_files_hold_is_refused_before_any_model_is_built(shieldgemma):
    """A hostile config.json cannot make the meta build create a million decoder layers (time, memory)."""
    import time

    keys, config = shieldgemma
    hostile = json.loads(json.dumps(config))
    hostile["text_config"]["num_hidden_layers"] = 1_000_000
    started = time.perf_counter()
    with pytest.raises(NotFound, match="num_hidden_layers = 1000000"):
        find_llm(keys, hostile)
    assert time.perf_counter() - started < 5


def test_a_decoder_saved_under_names_transformers_renames_on_load_is_refused_saying_so(tmp_path):
    """Kimi K2.5 saves its decoder's layers as ``language_model.model.blocks.N`` (transformers renames them to
    ``layers.N`` on load). A prefix layout would hand the merge ``model.blocks.N`` names no causal-LM base has;
    the refusal names the renamed tensor instead of a base mismatch."""
    if not hasattr(transformers, "Kimi_K25ForConditionalGeneration"):
        pytest.skip("this transformers has no Kimi K2.5")
    text = dict(
        {k: v for k, v in TEXT.items() if k != "layer_types"},
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=256,
    )
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    config = transformers.Kimi_K25Config(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    transformers.Kimi_K25ForConditionalGeneration(config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.blocks.0.input_layernorm.weight" in keys
    saved = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(NotFound, match=r"blocks\.0\..* loads into the decoder as .*layers\.0\..*no prefix layout"):
        find_llm(keys, saved)
    with pytest.raises(LayoutError, match="renames them on load"):
        detect_layout(keys, "kimi_k25", saved)


def test_a_config_json_with_a_non_finite_float_is_read_as_transformers_reads_it(tmp_path):
    """transformers 5 writes an infinite float (Nemotron-H's ``time_step_limit`` ends at inf) as
    ``{"__float__": "Infinity"}`` and decodes it when it loads config.json; read any other way, the family's
    strict config refuses it and the structure's answer would be that refusal instead of where the LLM is."""
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip("this transformers has no Nemotron-H")
    config = transformers.NemotronHConfig(
        **{k: v for k, v in TEXT.items() if k not in ("layer_types", "num_hidden_layers")},
        layers_block_type=["mamba", "attention"],
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=1,
        ssm_state_size=16,
    )
    torch.manual_seed(0)
    transformers.NemotronHForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"__float__": "Infinity"} in saved["time_step_limit"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # read as transformers reads it, the family builds, and the refusal is about its decoder's names
    with pytest.raises(NotFound, match="holds embeddings, layers, norm_f") as refused:
        find_llm(keys, saved)
    assert "cannot be built" not in str(refused.value)
