"""mmer.route.expansion: per-token weights in every routed module equal a reference built per token group.

The reference is independent of the implementation: the plain transformers base model (Qwen2ForCausalLM read
with ``from_pretrained``) with its weights set by hand to θ_base + m̄∘τ*, and a forward hook on every Linear and
norm of its decoder layers that recomputes the module's output token group by token group, with the group's
weights (``DecoupledCheckpoint.llm_tensor``) swapped in. Running the whole model once per modality and picking
rows would not do: attention mixes positions, so the groups must be split inside each module.
"""

from __future__ import annotations

import pytest
import torch
from route_fixtures import AUDIO_TOKENS, IMAGE_TOKENS, load_quietly, merged_checkpoint, model_inputs

import mmer
from mmer.io.layouts import layer_index
from mmer.route.expansion import TEXT
from mmer.route.models import RoutingInputError
from mmer.route.router import Router


@pytest.fixture(scope="session")
def merged(demo_models, tmp_path_factory):
    return merged_checkpoint(demo_models, tmp_path_factory)


@pytest.fixture(scope="module")
def router(merged):
    return Router.from_pretrained(merged)


@pytest.fixture(scope="module")
def expansion(router):
    return router.expansion()


@pytest.fixture(scope="module")
def mixed(expansion):
    """Text, an image, text, an audio clip, text: the paper's mixed prompt (App. F) in miniature."""
    return expansion.embed(
        [
            torch.tensor([[1, 2, 3]]),
            ("vision", model_inputs("vision")),
            torch.tensor([[4, 5]]),
            ("audio", model_inputs("audio")),
            torch.tensor([[6, 7, 8]]),
        ]
    )


def text_weight(ckpt: mmer.DecoupledCheckpoint, name: str) -> torch.Tensor:
    """θ_base + m̄∘τ*, m̄ the mean of every modality's mask, written out."""
    base = ckpt.base_tensor(name)
    if not next(s for s in ckpt.slots if s.name == name).merged:
        return base
    mean_mask = torch.stack([ckpt.mask(m, name).float() for m in ckpt.modalities]).mean(0)
    return (base.float() + mean_mask * ckpt.tau_star(name).float()).to(base.dtype)


def reference_model(merged, token_modality: torch.Tensor | None, route_norms: bool = True):
    """Plain base model on text weights; hooks recompute each routed module's output group by group."""
    from transformers import Qwen2ForCausalLM

    model = load_quietly(Qwen2ForCausalLM, merged / "base")
    ckpt = mmer.load_decoupled(merged)
    groups = ["text", *ckpt.modalities]
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(text_weight(ckpt, name))
    state = {"token_modality": token_modality}

    def hook(module, args, output):
        tm = state["token_modality"]
        if tm is None:
            return output
        x = args[0]
        out = torch.empty_like(output)
        for g in sorted(int(v) for v in tm.unique()):
            rows = tm == g
            if g == TEXT:
                out[rows] = module.forward(x[rows])
                continue
            saved = {n: p.data for n, p in module.named_parameters()}
            for n, p in module.named_parameters():
                p.data = module.group_weights[g][n]
            try:
                out[rows] = module.forward(x[rows])
            finally:
                for n, p in module.named_parameters():
                    p.data = saved[n]
        return out

    for name, module in model.named_modules():
        is_norm = "norm" in name.rsplit(".", 1)[-1]
        if layer_index(name + ".") is None or not (isinstance(module, torch.nn.Linear) or (route_norms and is_norm)):
            continue
        if not list(module.parameters(recurse=False)):
            continue
        module.group_weights = {
            g: {n: ckpt.llm_tensor(groups[g], f"{name}.{n}") for n, _ in module.named_parameters()}
            for g in range(1, len(groups))
        }
        module.register_forward_hook(hook)
    return model, state


def test_the_mixed_prompt_tags_image_and_audio_tokens_with_their_groups(expansion, mixed):
    # the vision part's own text tokens (11, 12 / 13, 14, 15) and the audio part's are text too
    vision_part = [0, 0] + [1] * IMAGE_TOKENS + [0, 0, 0]
    audio_part = [0, 0] + [2] * AUDIO_TOKENS + [0, 0]
    expected = [0] * 3 + vision_part + [0] * 2 + audio_part + [0] * 3
    assert mixed.token_modality.tolist() == [expected]
    assert expansion.groups == ("text", "vision", "audio")


def test_modality_positions_hold_encoder_features_and_text_positions_the_text_embeddings(
    merged, router, expansion, mixed
):
    vision = router.models["vision"].model
    inputs = model_inputs("vision")
    with torch.no_grad():
        features = vision.model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.reshape(-1, 64)
    image_rows = mixed.token_modality[0] == 1
    assert torch.equal(mixed.inputs_embeds[0, image_rows], features)
    text_rows = mixed.token_modality[0] == TEXT
    ids = torch.tensor([1, 2, 3, 11, 12, 13, 14, 15, 4, 5, 21, 22, 23, 24, 6, 7, 8])
    with mmer.load_decoupled(merged) as ckpt:
        table = text_weight(ckpt, "model.embed_tokens.weight")
    assert torch.equal(mixed.inputs_embeds[0, text_rows], table[ids])


@pytest.mark.parametrize("route_norms", [True, False], ids=["norms-routed", "norms-on-text"])
def test_mixed_forward_logits_equal_the_reference_computed_token_group_by_token_group(merged, router, route_norms):
    model = router.expansion(route_norms=route_norms)
    mixed = model.embed([torch.tensor([[1, 2]]), ("vision", model_inputs("vision")), ("audio", model_inputs("audio"))])
    reference, _ = reference_model(merged, mixed.token_modality, route_norms)
    with torch.no_grad():
        expected = reference(inputs_embeds=mixed.inputs_embeds, attention_mask=mixed.attention_mask).logits
    logits = model(mixed).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits, expected)


def test_routing_changes_the_result_compared_with_text_weights_everywhere(expansion, mixed):
    routed = expansion(mixed).logits
    unrouted = expansion(inputs_embeds=mixed.inputs_embeds, attention_mask=mixed.attention_mask).logits
    assert not torch.allclose(routed, unrouted)


def test_cached_and_rebuilt_per_modality_weights_give_identical_logits(router, expansion, mixed):
    rebuilt = router.expansion(cache_modality_weights=False)
    assert rebuilt.nbytes()["modality_cache"] == 0 < expansion.nbytes()["modality_cache"]
    assert torch.equal(rebuilt(mixed).logits, expansion(mixed).logits)


def test_text_only_input_runs_on_the_mean_mask_weights(merged, expansion):
    ids = torch.tensor([[5, 9, 2, 7]])
    reference, _ = reference_model(merged, None)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    assert torch.equal(expansion(input_ids=ids).logits, expected)
    tagged = expansion(input_ids=ids, token_modality=torch.zeros_like(ids)).logits
    assert torch.equal(tagged, expected)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "rebuilt"])
def test_generation_continues_on_text_weights_with_the_prompts_kv_cache(merged, router, mixed, cache):
    model = router.expansion(cache_modality_weights=cache)
    generated = model.generate(mixed, max_new_tokens=5, do_sample=False)
    # Reference: routed prefill, then greedy decoding with the hooks off (text weights) on the same cache.
    reference, state = reference_model(merged, mixed.token_modality)
    tokens = []
    with torch.no_grad():
        out = reference(inputs_embeds=mixed.inputs_embeds, attention_mask=mixed.attention_mask, use_cache=True)
        state["token_modality"] = None
        mask = mixed.attention_mask
        for _ in range(5):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = reference(input_ids=token, past_key_values=out.past_key_values, attention_mask=mask, use_cache=True)
    assert generated.tolist() == torch.cat(tokens, dim=1).tolist()


def test_a_token_modality_of_the_wrong_shape_is_refused(expansion, mixed):
    with pytest.raises(RoutingInputError, match="token_modality has shape"):
        expansion(inputs_embeds=mixed.inputs_embeds, token_modality=mixed.token_modality[:, :3])


def test_a_modality_part_without_its_placeholders_is_refused(expansion):
    inputs = model_inputs("vision")
    with pytest.raises(RoutingInputError, match="none of its placeholder ids"):
        expansion.embed([("vision", {**inputs, "input_ids": torch.tensor([[1, 2, 3]])})])


def test_a_text_id_outside_the_base_vocabulary_is_refused_with_a_hint(expansion):
    with pytest.raises(RoutingInputError, match="outside the base vocabulary") as info:
        expansion.embed([torch.tensor([[1, 512]])])
    assert "modality's part" in info.value.hint


def test_expansion_uses_the_routers_live_weights_as_its_text_weights(router, expansion):
    routed = expansion.routed["model.layers.0.self_attn.q_proj"]
    assert routed.inner.weight.data_ptr() == router.live["model.layers.0.self_attn.q_proj.weight"].data_ptr()


def test_retention_and_expansion_calls_interleave_without_changing_each_others_results(router, expansion, mixed):
    inputs = model_inputs("vision")
    first = expansion(mixed).logits
    retained = router(**inputs, modality="vision").logits
    assert torch.equal(expansion(mixed).logits, first)
    assert torch.equal(router(**inputs, modality="vision").logits, retained)
