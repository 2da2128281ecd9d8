"""Where every tensor of a source model went in a decoupled checkpoint, so that nothing is dropped silently.

A merge sorts each fine-tuned model's tensors into four buckets (docs/layouts.md §3):

- ``merged``: an LLM tensor of the base; θ_base + mᵢ∘τ* rebuilds it (MMER arXiv 2505.17110 §3.2), and the rows
  past the base's vocabulary, if the model added tokens, are kept as its private rows;
- ``private``: an LLM tensor the merge left out (an integer dtype, ``vocab_policy=exclude``), kept whole;
- ``component``: anything that is not the LLM (a vision or audio tower, a projector), copied as it is under
  ``components/<modality>/``;
- ``dropped``: a derived buffer (a rotary ``inv_freq``) that transformers recomputes on load, with the reason.

A source tensor in none of them, or a tensor the manifest names that the source does not have, is a problem:
merging tools have lost vision towers and linear-attention weights without a word, and this is the check that
would have said so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mmer.checkpoint.decoupled import DecoupledCheckpoint
from mmer.io.layouts import is_buffer_name

BUCKETS = ("merged", "private", "component", "dropped")
BUFFER_REASON = "a derived buffer (rotary inv_freq): transformers recomputes it on load, so it is never stored"


@dataclass(frozen=True)
class Placement:
    """The bucket one source tensor went to.

    Attributes:
        bucket: one of ``BUCKETS``.
        slot: the canonical LLM name it is merged or kept under (``None`` for a component).
        private_rows: rows past the base's kept as the model's own (added vocabulary), for a merged tensor.
        where: the checkpoint file that holds it, for a component.
        reason: why it was kept whole or dropped.
    """

    bucket: str
    slot: str | None = None
    private_rows: int = 0
    where: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bucket": self.bucket}
        for key in ("slot", "where", "reason"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.private_rows:
            out["private_rows"] = self.private_rows
        return out


def account_for(
    ckpt: DecoupledCheckpoint, modality: str, source_keys: Iterable[str]
) -> tuple[dict[str, Placement], list[str]]:
    """Each of ``source_keys`` (the source model's tensor names) with its bucket, and every tensor that is in no
    bucket or that the manifest names but the source lacks, as problems."""
    record = ckpt.modality(modality)
    slots = {s.name: s for s in ckpt.slots}
    rows = {p.name: p.shape[0] for p in record.private if p.row_start > 0}
    llm = {key: canonical for canonical, key in record.llm_keys.items()}
    components = set(record.component_tensors)
    files = {}
    if components:
        reader = ckpt.component_reader(modality)
        files = {name: info.file for name, info in reader.tensors.items()} if reader is not None else {}
    keys = set(source_keys)
    placements: dict[str, Placement] = {}
    problems: list[str] = []
    for key in sorted(keys):
        canonical = llm.get(key)
        if key in components:
            file = files.get(key)
            where = file.relative_to(ckpt.path).as_posix() if file is not None else record.component_dir
            placements[key] = Placement("component", where=where)
        elif canonical is None:
            problems.append(f"{modality}: source tensor {key!r} is in no bucket (not merged, private or a component)")
        elif canonical in slots and slots[canonical].reason == "buffer" or is_buffer_name(canonical):
            placements[key] = Placement("dropped", slot=canonical, reason=BUFFER_REASON)
        elif canonical not in slots:
            problems.append(f"{modality}: source tensor {key!r} maps to {canonical!r}, which the base does not have")
        elif slots[canonical].merged:
            placements[key] = Placement("merged", slot=canonical, private_rows=rows.get(canonical, 0))
        else:
            placements[key] = Placement("private", slot=canonical, reason=slots[canonical].reason)
    for key in sorted((set(llm) | components) - keys):
        problems.append(f"{modality}: the manifest names tensor {key!r}, which the source does not have")
    return placements, problems


def bucket_counts(placements: dict[str, Placement]) -> dict[str, int]:
    """How many source tensors went to each bucket (every bucket listed, zeros included)."""
    counts = dict.fromkeys(BUCKETS, 0)
    for placement in placements.values():
        counts[placement.bucket] += 1
    return counts
