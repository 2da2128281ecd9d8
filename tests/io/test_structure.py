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
