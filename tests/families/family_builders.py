"""Tiny models of every multimodal family the installed transformers ships, built from one shared text config.

Each family's own config class is instantiated with its defaults and then shrunk: every sub-config's size fields
become tiny (``SMALL``), and the LLM's text config (found by transformers' ``get_text_config``) takes the shared
``TEXT`` dimensions. Where a family's default config cannot build a model at all (a field its published
configs carry is left empty) or its validators need more than the generic shrink, ``FIXUPS`` supplies it, one
named function per family. The LLM inside a model is found through transformers' own structure
(``get_decoder`` and ``get_output_embeddings``), never by name, so the test's view of "the LLM" is independent of
mmer's name-based layouts (``mmer/io/layouts.py``) that it checks.

The base is the plain causal LM of the same text config: the first class transformers registers for a
``model_type`` the text config's names (``causal_base_types``: the longest ``_``-prefix, ``qwen2_vl_text`` →
``qwen2``, then names whose parts it contains in order, ``qwen3_omni_moe_text`` → ``qwen3_moe``) whose tensors
are the family's LLM tensors, name for name and shape for shape.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# The mappings whose families are multimodal LMs: image/video-text-to-text, multimodal LM (audio and omni LLMs
# included), speech-to-text. Missing names (another transformers version) are skipped.
MAPPINGS = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
)
BASE_VOCAB = 256
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    # multi-head latent attention (DeepSeek-V3-style LLMs: Kimi, dots)
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    global_head_dim=16,  # Gemma 4's wider global-attention heads
    hidden_size_per_layer_input=8,  # Gemma 4's per-layer input embeddings
    index_head_dim=8,  # a sparse-attention indexer's heads (dots3)
    shared_experts_intermediate_size=32,
    intermediate_size_mlp=64,  # Llama 4's dense layers
    linear_head_dim=8,  # GLM-5 Next's linear-attention heads
    swa_head_dim=8,  # Inkling 2's sliding-window heads
    ssm_state_size=16,  # Nemotron-H's Mamba layers
    moe_shared_expert_intermediate_size=32,
    decoder_ffn_dim=64,
    encoder_ffn_dim=64,
    unpadded_vocab_size=BASE_VOCAB,  # Inkling 2's head: the vocabulary before padding
    moe_hidden_size=32,  # Muse Spark's experts
    cross_hidden_size=16,  # Dia's decoder cross-attends to an encoder this wide
    cross_head_dim=8,
)
# Every other sub-config (vision/audio towers, projectors): the smallest sizes that still build.
SMALL = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    depth=1,
    embed_dim=16,
    num_heads=2,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_layers=1,
    projection_dim=16,
    out_hidden_size=TEXT["hidden_size"],
    ffn_dim=32,
    vocab_size=BASE_VOCAB,
    embedding_size=TEXT["hidden_size"],  # a talker's input: the thinker's hidden states (Qwen2.5-Omni)
    # speech-synthesis towers (an omni model's token2wav): vocoder channels, codec vocabulary, encoder widths
    upsample_initial_channel=64,
    num_embeds=64,
    emb_dim=16,
    enc_emb_dim=16,
    enc_dim=16,
    enc_attention_channels=16,
    enc_se_channels=16,
    # towers' own widths the names above miss: audio encoders' convolution front ends (Qwen3-Omni, Phi-4), a
    # projector's hidden layer (Cohere2 Vision), T5-style feed-forwards (UDOP), codec quantisers (Mimi)
    downsample_hidden_size=16,
    output_dim=TEXT["hidden_size"],  # an audio tower's output: the LLM's input width
    ext_pw_out_channel=16,
    depthwise_separable_out_channel=16,
    nemo_conv_channels=16,
    alignment_intermediate_size=32,
    d_ff=32,
    d_kv=8,
    codebook_dim=16,
    vector_quantization_hidden_dimension=16,
    upsample_groups=16,
    num_filters=4,  # a SEANet codec's first channel count, doubled at each of its stages (Mimi)
    decoder_dim=32,  # an omni model's code-to-wave decoder (Qwen3-Omni)
    thinker_hidden_size=TEXT["hidden_size"],  # a talker reads the thinker's hidden states
    adapter_out_dim=TEXT["hidden_size"],  # a tower's adapter feeds the LLM (dots3)
    adapter_in_dim=16,
    adapter_input_size=16,
    moe_intermediate_size=16,  # an MoE talker (Qwen3-Omni) or MoE vision tower (dots3)
    num_local_experts=4,
    num_experts_per_tok=2,
    # SAM-style image encoders (GOT-OCR 2, DeepSeek-OCR 2, PP-FormulaNet) and their necks
    output_channels=16,
    mlp_dim=32,
    post_conv_in_channels=16,
    post_conv_mid_channels=16,
    post_conv_out_channels=16,
    decoder_hidden_size=16,
    # projectors' hidden layers (GLM-5 Next, Llama 4, Inkling 2, Muse Glimmer)
    projection_intermediate_size=32,
    vision_output_dim=16,
    projector_input_dim=16,
    projector_output_dim=16,
    projection_hidden_dim=32,
    projector_hidden_size=32,
    # a speech encoder's and unit decoder's feed-forwards (SeamlessM4T), a cross-attention's key width (Dia)
    speech_encoder_intermediate_size=32,
    t2u_encoder_ffn_dim=32,
    t2u_decoder_ffn_dim=32,
    unit_embed_dim=16,
    cross_hidden_size=16,
    cross_head_dim=8,
    audio_hidden_size=16,
    text_hidden_size=TEXT["hidden_size"],  # a tower's output projection into the LLM (Inkling 2)
    decoder_intermediate_size=32,  # an audio tokenizer's decoder (WavTokenizer)
)
# Sizes given one per stage (a convolution stack's channels): every stage takes the one small width.
STAGE_SIZES = dict(conv_dim=16, downsample_channels=16, embed_dim=16, num_heads=2, num_groups=2, depths=1)
MAX_PARAMETERS = 2_000_000  # above this after shrinking, a family is not "tiny" and the matrix skips it


def families() -> dict[str, str]:
    """Every family in the multimodal mappings of the installed transformers: model_type → class name."""
    from transformers.models.auto import modeling_auto

    found: dict[str, str] = {}
    for mapping in MAPPINGS:
        for family, cls in getattr(modeling_auto, mapping, {}).items():
            found.setdefault(family, cls)
    return found


def _quiet():
    """transformers warns about every shrunk config; the matrix reads none of it."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Sizes a config may leave unset (``None``: derived, or, in some default configs, never set) that its model reads
# directly; the shrink sets them like any other size.
UNSET = ("head_dim",)


def _shrink(config, values: dict[str, int], seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    overrides = _homogeneous(config)
    for key, value in values.items():
        current = getattr(config, key, None)
        if _is_size(current) or (current is None and key in UNSET and hasattr(config, key)):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    layers = getattr(config, "num_hidden_layers", None)
    for key, value in STAGE_SIZES.items():
        stages = getattr(config, key, None)
        if isinstance(stages, (list, tuple)) and stages and all(_is_size(v) for v in stages):
            with contextlib.suppress(Exception):
                setattr(config, key, type(stages)([value] * len(stages)))
    for key in ("layer_types", "mlp_layer_types"):  # one entry per layer: attention kind, dense or MoE MLP
        if isinstance(getattr(config, key, None), list) and _is_size(layers):
            with contextlib.suppress(Exception):  # a derived (read-only) list follows num_hidden_layers itself
                setattr(config, key, getattr(config, key)[:layers])  # the pattern's start, as many as are left
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "padding_idx"):
        token = getattr(config, key, None)
        if _is_size(token) and _is_size(vocab) and token >= vocab:
            with contextlib.suppress(Exception):
                setattr(config, key, 0)
    _heterogeneous(config, overrides)
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, SMALL, seen)


def _homogeneous(config) -> dict:
    """A heterogeneous config (transformers' ``per_layer_config``: Gemma 4's wider global-attention heads, dots3's
    MLA layers) refuses to read a per-layer size globally; its overrides are taken off while the global sizes
    shrink, and returned with the global values they replaced."""
    spec = getattr(config, "__dict__", {}).get("_heterogeneity_spec")
    if spec is None:
        return {}
    overrides = {layer: dict(values) for layer, values in spec.per_layer_overrides.items()}
    config.per_layer_config = None
    return {"layers": overrides, "globals": {k: getattr(config, k, None) for v in overrides.values() for k in v}}


def _heterogeneous(config, overrides: dict) -> None:
    """The overrides back, on the layers the shrunk config still has, each size scaled as its global value was
    (a layer twice as wide as the rest stays twice as wide), so the tiny model keeps its per-layer shapes."""
    if not overrides:
        return
    layers = getattr(config, "num_hidden_layers", 0)
    kept = {}
    for layer, values in overrides["layers"].items():
        if layer >= layers:
            continue
        scaled = {}
        for key, value in values.items():
            was, now = overrides["globals"].get(key), getattr(config, key, None)
            if _is_size(value) and _is_size(was) and _is_size(now) and was and (value * now) % was == 0:
                value = max(1, value * now // was)
            scaled[key] = value
        kept[layer] = scaled
    if kept:
        config.per_layer_config = kept


def _text_width(config, text) -> None:
    """Sub-configs that feed the LLM directly take its width (their validators require it)."""
    for name in ("adaptor_config", "adapter_config"):
        sub = getattr(config, name, None)
        for key in ("hidden_size", "text_hidden_size"):
            if name == "adaptor_config" and key == "hidden_size" or key == "text_hidden_size":
                if _is_size(getattr(sub, key, None)):
                    setattr(sub, key, text.hidden_size)
        if isinstance(getattr(sub, "vision_feature_layer", None), list):  # indexes the shrunk tower's layers
            sub.vision_feature_layer = [-1]


def _balanced_encoder(config, text) -> None:
    """T5Gemma 2 refuses an encoder unlike its decoder: the encoder's text config takes the decoder's sizes."""
    encoder = config.encoder.text_config
    _shrink(encoder, TEXT, set())
    encoder.layer_types = list(text.layer_types)


def _fun_asr_adaptor(config, text) -> None:
    config.adaptor_config.intermediate_size = text.hidden_size // 4  # its validator: text width / 4


def _talker_shared_expert(config, text) -> None:
    """Qwen3-Omni's talker builds a shared expert its default text config has no size for (its checkpoints carry
    one): it takes the thinker's."""
    talker = config.talker_config.text_config
    if not hasattr(talker, "shared_expert_intermediate_size"):
        talker.shared_expert_intermediate_size = TEXT["shared_expert_intermediate_size"]


def _vocabulary_map(*names: str):
    """Chameleon and Emu3 map image tokens through a vocabulary their default config leaves empty (a checkpoint's
    config carries the tokenizer's): the special tokens they look up, at the top of the shared vocabulary."""

    def fix(config, text) -> None:
        config.vocabulary_map = {name: BASE_VOCAB - 1 - i for i, name in enumerate(names)}

    return fix


def _rope_per_layer_type(config, text) -> None:
    """Cohere Compass reads one rope setting per layer type; its default config has none."""
    text.rope_parameters = {kind: {"rope_type": "default", "rope_theta": 10000.0} for kind in set(text.layer_types)}


def _mrope_sections(config, text) -> None:
    """ERNIE 4.5 VL's 3-D rope splits the head's frequencies into (h, w, t) sections: they must add up to the
    shrunk head's."""
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [1, 1, TEXT["head_dim"] // 2 - 2]}


def _deepstack(config, text) -> None:
    """Granite 4 Vision injects vision layers into LLM layers its default config does not name: the last vision
    layer into both of the shrunk LLM's layers."""
    config.deepstack_layer_map = [(-1, 0)]
    config.downsample_rate = "1/4"  # its documented example (a query window of 1 per key window of 4)
    config.spatial_target_layers = [text.num_hidden_layers - 1]


def _mlp_layer_types(config, text) -> None:
    """DeepSeek-OCR 2's decoder reads each layer's MLP kind from a list its default config leaves empty: a dense
    first layer, sparse (MoE) after it, as its checkpoints have."""
    text.mlp_layer_types = ["dense"] + ["sparse"] * (text.num_hidden_layers - 1)


def _audio_codebooks(config, text) -> None:
    """Kyutai's embedding holds the text vocabulary and every audio codebook's; its padding row is the last one."""
    config.codebook_vocab_size = 16
    config.audio_pad_token_id = config.vocab_size + config.num_codebooks * config.codebook_vocab_size


def _small_vq(config, text, name: str = "vq_config") -> None:
    """Chameleon's, Emu3's and Janus's image tokenisers (VQ-VAEs; Apertus 1.5's vision tokenizer) are convolution
    stacks sized by channel counts the generic names do not cover."""
    vq = getattr(config, name)
    for key, value in dict(base_channels=32, num_embeddings=16, codebook_size=16, latent_channels=4).items():
        if _is_size(getattr(vq, key, None)):
            setattr(vq, key, value)
    vq.num_res_blocks = 1
    vq.channel_multiplier = [1] * len(vq.channel_multiplier)  # as many stages, none wider than the first


def _both(*fixes):
    def fix(config, text) -> None:
        for one in fixes:
            one(config, text)

    return fix


def _hybrid_layers(config, text) -> None:
    """Nemotron-H lists its layers by kind (Mamba, attention, MoE) rather than counting them: one of each kind, and
    Mamba heads that fit the shrunk width."""
    text.layers_block_type = ["linear_attention", "full_attention", "moe"]
    text.mamba_num_heads, text.mamba_head_dim, text.n_groups = 8, 8, 1


def _apertus_tokens(config, text) -> None:
    """Apertus 1.5 tokenises images (a VQ-VAE) and audio (WavTokenizer) into ranges of its own vocabulary, back
    to back: both codebooks shrink, and their ranges move inside the shrunk vocabulary."""
    _small_vq(config, text, "vision_config")
    config.audio_config.codebook_size = 16
    config.image_token_offset = BASE_VOCAB - 56
    config.audio_token_offset = config.image_token_offset + config.vision_config.codebook_size
    for part in _config_tree(config):  # its tokenizer decoders' GroupNorms: as many channels as groups
        if _is_size(getattr(part, "decoder_attention_num_groups", None)):
            part.decoder_hidden_size = part.decoder_attention_num_groups


def _short_codec(config, text) -> None:
    """VibeVoice's audio tokenizers double their channels at each of six downsampling stages: two stages are
    kept (a depth per stage, and one more for the stem)."""
    for part in _config_tree(config):
        if isinstance(getattr(part, "downsampling_ratios", None), (list, tuple)):
            part.downsampling_ratios = list(part.downsampling_ratios[:2])
            part.depths = [1] * (len(part.downsampling_ratios) + 1)


def _cross_attention_layers(config, text) -> None:
    """Mllama's LLM interleaves cross-attention layers (to the image) at indices past the shrunk layer count; the
    last layer stays one, so the tiny model is the family (a base-less layer kind), not a plain Llama."""
    text.cross_attention_layers = [text.num_hidden_layers - 1]


def _talker_merge_size(config, text) -> None:
    """Qwen3-Omni's talker reads the vision tower's spatial merge size, which its default config does not copy."""
    config.talker_config.spatial_merge_size = config.thinker_config.vision_config.spatial_merge_size


def _experts(config, text) -> None:
    """Diffusion Gemma builds its MoE block on every layer, from expert counts its default config leaves unset."""
    text.num_experts, text.top_k_experts, text.moe_intermediate_size = 4, 2, TEXT["moe_intermediate_size"]


def _qformer_heads(config, text) -> None:
    """Granite 4 Vision's Q-Former takes one head per 64 channels of the vision tower: the tower keeps 64."""
    config.vision_config.hidden_size = 64


def _latent_heads(config, text) -> None:
    """dots3's attention (multi-head latent) requires as many key/value heads as query heads, on every layer."""
    spec = text.__dict__.get("_heterogeneity_spec")
    layers = {i: dict(v) for i, v in spec.per_layer_overrides.items()} if spec else {}
    text.per_layer_config = None
    text.num_key_value_heads = text.num_attention_heads
    for values in layers.values():
        if "num_attention_heads" in values:
            values["num_key_value_heads"] = values["num_attention_heads"]
    if layers:
        text.per_layer_config = layers


def _key_value_heads(config, text) -> None:
    """Moonshine Streaming's decoder reads a key/value head count its default config does not define."""
    if not hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = config.num_attention_heads


# What a family's own validators or default config need beyond the generic shrink (each fixes the harness, not
# the family: a published checkpoint's config carries what the default one lacks).
FIXUPS = {
    "t5gemma2": _balanced_encoder,
    "fun_asr_nano": _fun_asr_adaptor,
    "qwen3_omni_moe": _both(_talker_shared_expert, _talker_merge_size),
    "chameleon": _both(_vocabulary_map("<image>"), _small_vq),
    "emu3": _both(_vocabulary_map("<image>", "<|extra_200|>"), _small_vq),
    "janus": _small_vq,
    "mllama": _cross_attention_layers,
    "apertus1p5": _apertus_tokens,
    "vibevoice": _short_codec,
    "vibevoice_asr": _short_codec,
    "nemo_speechlm": _hybrid_layers,
    "nemotron_h_omni": _hybrid_layers,
    "cohere_compass": _rope_per_layer_type,
    "ernie4_5_vl_moe": _mrope_sections,
    "granite4_vision": _both(_deepstack, _qformer_heads),
    "diffusion_gemma": _experts,
    "dots3_note": _latent_heads,
    "deepseek_ocr2": _mlp_layer_types,
    "kyutai_speech_to_text": _audio_codebooks,
    "moonshine_streaming": _key_value_heads,
}


def text_config(config):
    """The LLM's config: transformers' ``get_text_config(decoder=True)``, except for a flat encoder-decoder
    (Whisper) where that is a detached copy of the decoder's fields (its ``decoder_*`` sizes dropped), which
    neither shrinks the model nor builds its causal LM: there, the config itself."""
    text = config.get_text_config(decoder=True)
    return text if any(text is part for part in _config_tree(config)) else config


def _config_tree(config):
    yield config
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _config_tree(sub)


def tiny_config(family: str, extra_vocab: int = 0):
    """The family's config with every size shrunk and the shared ``TEXT`` dimensions in its text config."""
    from transformers import CONFIG_MAPPING

    with _quiet():
        config = CONFIG_MAPPING[family]()
        text = text_config(config)
        seen: set[int] = set()
        # the text config first (the towers' pass then skips it); where it is the whole config (an encoder-decoder
        # such as Whisper), the towers' sizes TEXT does not name shrink with it
        vocab = BASE_VOCAB + extra_vocab
        text_sizes = {**TEXT, "vocab_size": vocab, "vocab_size_per_layer_input": vocab}
        _shrink(text, text_sizes if text is not config else {**SMALL, **text_sizes}, seen)
        if text is not config:
            _shrink(config, SMALL, seen)
        _text_width(config, text)
        if family in FIXUPS:
            FIXUPS[family](config, text)
        # as from_pretrained will read it back: a config class that derives one sub-config's sizes from another's
        # (Idefics2's perceiver takes the text width) builds the model its own loader expects
        with contextlib.suppress(Exception):
            config = type(config).from_dict(config.to_dict())
            text = text_config(config)
        for target in {id(config): config, id(text): text}.values():
            if hasattr(target, "tie_word_embeddings"):
                target.tie_word_embeddings = False
    return config


# Families whose mapping names a class that cannot load back what it saves under the family's config; the
# family's own class (the one its published checkpoints carry) is built instead.
OWN_CLASS = {
    # the mapping's Gemma3ForConditionalGeneration: shieldgemma2's checkpoint conversion mapping (a "model."
    # prefix) is written for ShieldGemma2ForImageClassification, so its save→load round trip loses the LLM
    "shieldgemma2": "ShieldGemma2ForImageClassification",
}


def model_class(family: str):
    import transformers

    return getattr(transformers, OWN_CLASS.get(family) or families()[family])


def count_parameters(family: str) -> int:
    """Parameters of the tiny model, counted on the meta device (nothing allocated)."""
    with _quiet(), torch.device("meta"):
        model = model_class(family)(tiny_config(family))
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _seeded(seed: int):
    """Weights drawn from ``seed``, including any the family's own initialisation leaves as ``torch.empty``
    (Qwen3-Omni's MoE talker experts): those would hold whatever memory held, NaN at times, which no two runs
    (nor a tensor and its own copy, under ``torch.equal``) agree on. Uninitialised memory is filled with NaN while
    the model is built, and exactly those entries are drawn from ``seed`` after."""
    import torch.utils.deterministic as deterministic

    torch.manual_seed(seed)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    built = []
    try:
        yield built
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        deterministic.fill_uninitialized_memory = fill
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in built:
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point() and tensor.device.type != "meta" and tensor.isnan().any():
                    drawn = (torch.randn(tensor.shape, generator=g) * 0.02).to(tensor.dtype)
                    tensor.copy_(torch.where(tensor.isnan(), drawn, tensor))


def build(family: str, seed: int, extra_vocab: int = 0):
    """The tiny model, its weights drawn from ``seed``."""
    with _quiet(), _seeded(seed) as built:
        built.append(model_class(family)(tiny_config(family, extra_vocab)).eval())
    return built[0]


def _module_name(model, module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def llm_names(model) -> dict[str, str]:
    """Canonical causal-LM name → the model's own state-dict key, for its LLM as transformers defines it.

    The LLM is the first sub-model (the model itself first) with a decoder of its own, ``get_decoder()``
    (embeddings, layers and final norm), and a head, ``get_output_embeddings()``: the model's own for most
    families, an omni model's thinker's, a classifier's wrapped VLM's. An empty dict when there is none.
    """
    from transformers import PreTrainedModel

    for _, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        try:
            decoder, head = sub.get_decoder(), sub.get_output_embeddings()
        except (AttributeError, NotImplementedError, ValueError, TypeError):
            continue
        if decoder is None or decoder is sub or head is None:
            continue
        decoder = _innermost_decoder(decoder)
        body, head_name = _module_name(model, decoder), _module_name(model, head)
        names = {}
        for key in model.state_dict():
            if key.startswith(body + "."):
                names["model." + key[len(body) + 1 :]] = key
            elif key.startswith(head_name + "."):
                names["lm_head." + key[len(head_name) + 1 :]] = key
        return names
    return {}


# Text configs whose causal LM transformers registers under an unrelated name; each read off the family's modular
# source (its text config and decoder subclass that family's), never guessed from the weights.
TEXT_BASES = {"granite4_vision_text": "granite"}  # Granite4VisionTextConfig(GraniteConfig), …TextModel(GraniteModel)


def _innermost_decoder(decoder):
    """Llama 4's ``get_decoder()`` is its whole causal LM (decoder and head): the decoder is the sub-model inside
    it that holds the same input embeddings and no head."""
    from transformers import PreTrainedModel

    while True:
        try:
            if decoder.get_output_embeddings() is None:
                return decoder
            embeddings = decoder.get_input_embeddings()
        except (AttributeError, NotImplementedError, ValueError, TypeError):
            return decoder
        inner = [
            child
            for child in decoder.children()
            if isinstance(child, PreTrainedModel) and child.get_input_embeddings() is embeddings
        ]
        if len(inner) != 1:
            return decoder
        decoder = inner[0]


def causal_base_types(text_model_type: str) -> list[str]:
    """The model_types of the plain causal LMs a text config of ``text_model_type`` may be the LLM of, in the
    order they are tried: :data:`TEXT_BASES`, the longest ``_``-prefix that has one (``qwen2_vl_text`` →
    ``qwen2``), then every other whose parts appear in order in the name (``qwen3_omni_moe_text`` →
    ``qwen3_moe``), longest first."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    parts = text_model_type.split("_")
    found = [TEXT_BASES[text_model_type]] if text_model_type in TEXT_BASES else []
    found += ["_".join(parts[:end]) for end in range(len(parts), 0, -1) if "_".join(parts[:end]) in causal]

    def in_order(candidate: str) -> bool:
        rest = iter(parts)
        return all(part in rest for part in candidate.split("_"))

    found += sorted((c for c in causal if in_order(c)), key=lambda c: (-len(c.split("_")), c))
    return list(dict.fromkeys(found))


def causal_base_type(text_model_type: str) -> str | None:
    """The first of :func:`causal_base_types`, or ``None``."""
    return next(iter(causal_base_types(text_model_type)), None)


def build_base(family: str, model=None):
    """The plain causal LM of the family's text config (``BASE_VOCAB`` rows), or ``None`` if transformers has
    none. Given the family's ``model``, the first candidate (:func:`causal_base_types`) whose tensors are its
    LLM's; the first candidate when none is (its mismatch is the family's answer)."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    text = text_config(tiny_config(family))
    settings = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    first = None
    for base_type in causal_base_types(text.model_type):
        try:
            with _quiet(), _seeded(0) as built:
                cls = getattr(transformers, causal[base_type])
                # the class's own config (Emu3ForCausalLM takes Emu3TextConfig, not the family's composite one)
                config = (getattr(cls, "config_class", None) or CONFIG_MAPPING[base_type])(**settings)
                config.tie_word_embeddings = False
                built.append(cls(config).eval())
            base = built[0]
        except Exception:
            if first is None and text.model_type.startswith(base_type):
                raise  # a prefix candidate's own failure is the answer (the name says it is this family's LLM)
            continue
        if model is None or mismatch(base, model) is None:
            return base
        first = first or base
    return first


def mismatch(base, model) -> str | None:
    """Why ``base`` cannot be the base of ``model``'s LLM (names or shapes differ), or ``None`` if it can."""
    names = llm_names(model)
    if not names:
        return f"{type(model).__name__} has no decoder of its own (get_decoder/get_output_embeddings)"
    base_state = base.state_dict()
    state = model.state_dict()
    for canonical in sorted(set(base_state) ^ set(names)):
        where = "the base" if canonical in base_state else type(model).__name__
        return f"{canonical} exists only in {where}"
    for canonical, key in names.items():
        have, want = tuple(state[key].shape), tuple(base_state[canonical].shape)
        if have != want and not (have[1:] == want[1:] and len(have) == len(want) and have[0] > want[0]):
            return f"{canonical} is {list(have)} in the model, {list(want)} in the base"
    return None


def fine_tune(model, base, seed: int, density: float = 0.5) -> None:
    """Set the model's LLM to θ_base + a sparse seeded τ (rows past the base vocabulary keep their own values)."""
    g = torch.Generator().manual_seed(seed)
    names = llm_names(model)
    state = model.state_dict()
    with torch.no_grad():
        for canonical, tensor in base.state_dict().items():
            if not tensor.is_floating_point():
                continue
            delta = torch.randn(tensor.shape, generator=g) * 0.02 * (torch.rand(tensor.shape, generator=g) < density)
            target = state[names[canonical]]
            (target[: tensor.shape[0]] if tensor.dim() else target).copy_(tensor + delta.to(tensor.dtype))


@dataclass
class FamilyModels:
    """One family's base and two fine-tunes on disk."""

    family: str
    base: Path
    first: Path
    second: Path


MODALITIES = ("first", "second")
EXTRA_VOCAB = {"first": 2, "second": 1}  # private vocabulary rows each fine-tune adds (its new tokens)


def write_family(family: str, root: Path) -> FamilyModels:
    """Save the base and two fine-tunes (different seeds, towers and added rows) with ``save_pretrained``."""
    models = {name: build(family, seed, EXTRA_VOCAB[name]) for seed, name in enumerate(MODALITIES, start=1)}
    base = build_base(family, models[MODALITIES[0]])
    if base is None:
        raise ValueError(f"{family}: no causal LM for its text config")
    with _quiet():
        base.save_pretrained(root / "base")
        for seed, (name, model) in enumerate(models.items(), start=1):
            fine_tune(model, base, seed)
            model.save_pretrained(root / name)
            if hasattr(model, "load_speakers"):  # an omni model loads its voices from a file beside the weights
                torch.save({"voice": {"bos_token": 0, "cond": torch.zeros(1, 4)}}, root / name / "spk_dict.pt")
    return FamilyModels(family, root / "base", root / MODALITIES[0], root / MODALITIES[1])


def load(family: str, directory: Path, strict: bool = False):
    """The family's own class loaded from ``directory``; ``strict``: every weight of the files lands in the
    model and every weight of the model comes from the files (transformers warns and goes on otherwise)."""
    from transformers import PreTrainedModel

    cls = model_class(family)
    with _quiet():
        if not strict:
            return cls.from_pretrained(directory).eval()
        if cls.from_pretrained.__func__ is not PreTrainedModel.from_pretrained.__func__:
            cls.from_pretrained(directory)  # the family's own loader (Qwen2.5-Omni's reads its voices) loads it
        # transformers' loader itself reports what did not land (an override may not pass the report through)
        model, info = PreTrainedModel.from_pretrained.__func__(cls, directory, output_loading_info=True)
    if strict:
        problems = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v} or info["error_msgs"]
        assert not problems, f"{family}: {directory.name} does not load cleanly with its own class: {problems}"
    return model.eval()


def loaded_names(model, keys: set[str]) -> dict[str, str]:
    """The in-memory name transformers loads each on-disk key into: its checkpoint conversion mapping's renames
    and converters (transformers 5 fuses some MoE experts), as ``from_pretrained`` applies them. Identity for a
    transformers without that machinery."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {key: key for key in keys}
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    meta = model.state_dict()
    names = {}
    for key in keys:
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if name not in meta and key in meta:  # as from_pretrained: a key already in the model keeps its name
            name, _ = rename_source_key(key, [], [], model.base_model_prefix, meta)
        names[key] = name
    return names
