"""A candidate: one modality rebuilt at one (λ, K) from the base, its original model and that K's τ*.

What every score receives. It holds paths and small values only, so it pickles and travels to worker
processes and Ray tasks; each worker reads the weights itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mmer.checkpoint.decoupled import modality_tensor
from mmer.checkpoint.manifest import PrivateRecord
from mmer.config import ModelSpec
from mmer.io.reader import CheckpointReader, copy_side_files
from mmer.io.writer import PlannedTensor, ShardedWriter, StagedOutput
from mmer.merge.masks import MASKS, rebuild_weight
from mmer.merge.slot import Variant, mask_source
from mmer.merge.task_vectors import task_vector
from mmer.plan import Slot, SourceModel, open_source

Point = tuple[float, float]  # (K, α): the merge options that change τ*; λ only changes the masks


class Scored(Protocol):
    """What a backend scores: a :class:`Candidate`, or a joint one (:class:`mmer.tune.joint.JointCandidate`)."""

    def fields(self) -> dict[str, Any]:
        """The values that name it in a report's row."""
        ...


@dataclass(frozen=True)
class CandidateInputs:
    """Everything a worker needs to rebuild one modality at any λ of one (K, α): paths and small values only."""

    base_dir: str
    model_dir: str
    modality: str
    index: int  # the model's position in the merge (DARE's seeds depend on it)
    tau_dir: str  # τ* of this (K, α): the checkpoint's tau_star/ or a scratch copy
    threshold: float | None  # the model's global trim threshold at this K
    variant: Variant
    slots: tuple[Slot, ...]
    private: tuple[PrivateRecord, ...]
    device: str = "cpu"


@dataclass(frozen=True)
class Candidate:
    """One modality at one (λ, K, α): what a score function receives.

    Attributes:
        modality: the modality's name.
        lambda_: the candidate λ of its mask.
        k: the candidate K of the trim (τ* is this K's).
        alpha: the candidate α scaling τ* (the masks compare each τᵢ with this τ*).
        inputs: where the weights are read from (internal; picklable, so candidates travel to workers).
        validation: the file or directory the caller named as validation data (``--validation``), for the
            score to read; ``None`` when none was named.
    """

    modality: str
    lambda_: float
    k: float
    alpha: float
    inputs: CandidateInputs
    validation: str | None = None

    @property
    def source_dir(self) -> Path:
        """The fine-tuned model's directory: its config, tokenizer and processor files."""
        return Path(self.inputs.model_dir)

    def _open(self) -> tuple[SourceModel, SourceModel, CheckpointReader]:
        base = open_source(ModelSpec(self.inputs.base_dir))
        model = open_source(ModelSpec(self.inputs.model_dir, modality=self.modality))
        return base, model, CheckpointReader(self.inputs.tau_dir)

    def state_dict(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The rebuilt LLM, θ_base + mᵢ∘τ* with mᵢ at this λ (private vocabulary rows appended), by canonical
        name, in the base's dtype: exactly what ``mmer merge`` with this λ, K and α would rebuild."""
        device = torch.device(device or self.inputs.device)
        base, model, tau = self._open()
        private = {p.name: p for p in self.inputs.private}
        out = {}
        try:
            for slot in self.inputs.slots:
                p = private.get(slot.name)
                theta = None
                if slot.merged or p is not None:
                    theta = model.reader.get(model.llm[slot.name].name).to(device)
                shared = functools.partial(self._shared_rows, base, tau, slot, theta, device)
                if p is None:
                    out[slot.name] = modality_tensor(shared)
                else:
                    own = theta if p.row_start == 0 else theta[p.row_start :]  # type: ignore[index]
                    out[slot.name] = modality_tensor(shared, own, p.row_start)
        finally:
            for reader in (base.reader, model.reader, tau):
                reader.close()
        return out

    def _shared_rows(
        self,
        base: SourceModel,
        tau: CheckpointReader,
        slot: Slot,
        theta: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Rows ``[0, V_base)`` of one rebuilt tensor: θ_base + mᵢ∘τ* with mᵢ at this λ when merged, else θ_base."""
        b = base.reader.get(base.llm[slot.name].name).to(device)
        if not slot.merged or theta is None:
            return b
        rows = b.shape[0]
        raw = task_vector(theta, b, rows if theta.shape[0] != rows else None)
        src = mask_source(raw, self.inputs.variant, self.inputs.index, slot.name, self.inputs.threshold)
        stored = tau.get(slot.name).to(device)
        return rebuild_weight(b, stored, MASKS[self.inputs.variant.mask].fn(src, stored.float(), self.lambda_))

    def original_state_dict(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The fine-tuned model's own LLM tensors, by canonical name (what the rebuilt one is compared with)."""
        device = torch.device(device or self.inputs.device)
        base = open_source(ModelSpec(self.inputs.base_dir))
        model = open_source(ModelSpec(self.inputs.model_dir, modality=self.modality))
        try:
            out = {}
            for slot in self.inputs.slots:
                owner = model if slot.name in model.llm else base
                out[slot.name] = owner.reader.get(owner.llm[slot.name].name).to(device)
            return out
        finally:
            base.reader.close()
            model.reader.close()

    def causal_lm(self, device: str | torch.device | None = None, *, original: bool = False) -> torch.nn.Module:
        """A transformers causal LM (the base's class and config, vocabulary sized to this modality) holding the
        rebuilt LLM, or the original one with ``original=True``. In eval mode; nothing else is allocated."""
        from mmer.route.models import bind_model, causal_lm_class, empty_model, llm_layout, load_config

        device = torch.device(device or self.inputs.device)
        tensors = self.original_state_dict(device) if original else self.state_dict(device)
        config = load_config(Path(self.inputs.base_dir))
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None:
            config.vocab_size = embed.shape[0]
        model = empty_model(causal_lm_class(config, Path(self.inputs.base_dir)), config)
        bind_model(model, llm_layout(model), tensors.get, None, device, self.inputs.model_dir)
        return model.eval()

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the whole rebuilt model to ``directory`` in its source's layout and key names: LLM, components,
        config, tokenizer and processor files, loadable by the source's own ``from_pretrained``."""
        inputs = (self.inputs.base_dir, self.inputs.model_dir, self.inputs.tau_dir)
        staged = StagedOutput(directory, overwrite=overwrite, kind="tune-candidate", protect=inputs)
        tensors = self.state_dict("cpu")
        model = open_source(ModelSpec(self.inputs.model_dir, modality=self.modality))
        try:
            llm = [(info.name, tensors.get(canonical)) for canonical, info in model.llm.items()]
            entries = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in llm if t is not None] + [
                PlannedTensor(i.name, i.dtype, tuple(i.shape)) for i in model.components
            ]
            own = {canonical for canonical in model.llm if canonical not in tensors}
            entries += [PlannedTensor(model.llm[c].name, model.llm[c].dtype, model.llm[c].shape) for c in own]
            with staged as staging:
                writer = ShardedWriter(
                    staging,
                    sorted(entries, key=lambda e: e.name),
                    5 * 1000**3,
                    metadata={"format": "pt", "mmer_tune_candidate": f"{self.modality}"},
                )
                try:
                    for name, t in llm:
                        if t is not None:
                            writer.write(name, t)
                    for c in own:
                        writer.write(model.llm[c].name, model.reader.get(model.llm[c].name))
                    for info in model.components:
                        writer.write(info.name, model.reader.get(info.name))
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                copy_side_files(model.path, staging)
        finally:
            model.reader.close()
        return Path(directory)

    def fields(self) -> dict[str, Any]:
        return {"modality": self.modality, "k": self.k, "alpha": self.alpha, "lambda": self.lambda_}

    def __repr__(self) -> str:
        return f"Candidate({self.modality}, λ={self.lambda_:g}, K={self.k:g}, α={self.alpha:g})"
