"""Tune λ per modality, and optionally K, against a score (MMER picks λ on a validation set; docs/method.md §7).

The paper chooses α and each λᵢ "by validation-set accuracy" and never describes the validation set. This
module makes the search explicit and cheap:

- **λᵢ alone.** Modality i's rebuilt model θ̂ᵢ = θ_base + mᵢ∘τ* depends on λ only through its own mask mᵢ (Eq.
  3), and τ* does not depend on any λ. So each λᵢ is tuned on its own, |Λ| candidates per modality rather than
  |Λ|ⁿ, and every λ reuses the same τ*: no candidate re-merges. Given a decoupled checkpoint, its τ* itself is
  reused for its own K.
- **K** changes every τᵢ's trim and so τ*: each K of the grid is merged once (in memory, all K together in one
  shared streaming pass, τ* kept in a scratch directory when candidates need it), then its λ candidates reuse
  it. The chosen K maximises the mean over modalities of each modality's best score at that K.

Scores (higher is better):

- ``recon``: −‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁, the relative ℓ1 reconstruction error of ``mmer compare``, training-free, for
  every candidate in the same streaming pass that computes τ* (no per-candidate work at all). Note that Eq. 3 at
  λ = 1 is the ℓ1-optimal mask per entry (Eq. 2), so this proxy mostly confirms λ ≈ 1; it is informative
  for K, and as a sanity check.
- ``logits``: −KL(p_θᵢ ‖ p_θ̂ᵢ), the mean next-token KL divergence of the rebuilt LLM from the original one on
  probe inputs the caller gives (token ids or text), plus top-1 agreement in the details. The LLM alone is run
  (a causal LM built from the base's config), so probes are text.
- ``module:function`` (or ``path/to/file.py:function``, or a Python callable): the caller's own score,
  e.g. accuracy on a held-out split. It is called with one :class:`Candidate` and returns a number, or a
  mapping with a ``score`` number and any other values to keep as details. A candidate gives the rebuilt
  model three ways: :meth:`Candidate.state_dict` (LLM tensors by canonical name), :meth:`Candidate.causal_lm`
  (a transformers causal LM of the LLM), :meth:`Candidate.save_pretrained` (the whole multimodal model in its
  source's layout, components and processor files included, for any evaluation harness's ``from_pretrained``).

Per-candidate scores (``logits`` and callables) run in parallel: ``jobs`` workers as processes (the default for
jobs > 1; each sets torch to its share of the cores), threads, or Ray tasks (``backend="ray"``: the local
machine by default, a cluster with ``ray_address``; every worker must see the same paths). ``recon`` needs no
workers: its cost is the reads, shared by every candidate.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmer.checkpoint.decoupled import load_decoupled, modality_tensor
from mmer.checkpoint.manifest import PrivateRecord
from mmer.checkpoint.sources import (
    base_read_spec,
    base_spec,
    check_source_names,
    checkpoint_options,
    original_spec,
    pinned_spec,
    source_mismatch,
)
from mmer.config import ModelSpec, Recipe
from mmer.engine import find_thresholds, read_slot, tau_dtype
from mmer.errors import ConfigError, MmerError, ModelNotFoundError
from mmer.io.jsonfile import MAX_JSON_BYTES, loads_bounded
from mmer.io.reader import CheckpointReader, copy_side_files
from mmer.io.report_files import save_figure, text_written_by, write_report_file
from mmer.io.resolve import resolve_model
from mmer.io.writer import PlannedTensor, ShardedWriter, StagedOutput
from mmer.merge.dare import dare
from mmer.merge.error import error_l1, relative_error, tau_l1
from mmer.merge.masks import MASKS, reconstruct
from mmer.merge.methods import METHODS
from mmer.merge.slot import Variant, merge_slot
from mmer.merge.task_vectors import task_vector
from mmer.merge.trim import tensor_threshold, trim
from mmer.plan import MergePlan, Slot, SourceModel, build_plan, open_source, resolve_variant
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.version import __version__

# The paper's sensitivity grid (docs/method.md §7): λ·50 % ∈ {15, 30, 45, 60, 75} %, and K ∈ {60, 80, 100} %.
DEFAULT_LAMBDAS = (0.3, 0.6, 0.9, 1.2, 1.5)
DEFAULT_KS = (0.6, 0.8, 1.0)
TUNE_REPORT_FORMAT = "mmer-tune/1"
TUNED_RECIPE_FIRST_WORDS = "# λ per modality and K chosen by `mmer tune`"
TUNED_RECIPE_SIGNATURE = text_written_by(TUNED_RECIPE_FIRST_WORDS)


def tune_report_written_by_mmer(head: bytes) -> bool:
    """tune.json carries its format tag first; reports written before the tag began with the score."""
    return head.startswith((f'{{\n  "format": "{TUNE_REPORT_FORMAT}"'.encode(), b'{\n  "score": '))


BUILTIN_SCORES = {
    "recon": "−relative ℓ1 reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁",
    "logits": "−mean next-token KL(original ‖ rebuilt) on the probes",
}
BACKENDS = ("auto", "serial", "thread", "process", "ray")


class TuneError(MmerError):
    """A score could not be computed: the callable failed or returned no number, a probe does not fit."""

    def __reduce__(self) -> tuple[Any, ...]:  # survives a process or Ray worker with its fields
        return (_tune_error, (self.message, self.file, self.tensor, self.key, self.hint))


def _tune_error(message: str, file: str | None, tensor: str | None, key: str | None, hint: str | None) -> TuneError:
    return TuneError(message, file=file, tensor=tensor, key=key, hint=hint)


# ------------------------------------------------------------------------------------------------ candidates
def mask_source(raw: torch.Tensor, variant: Variant, index: int, name: str, threshold: float | None) -> torch.Tensor:
    """The τᵢ the mask rule compares with τ*, exactly as ``merge.slot.merge_slot`` makes it for model ``index``:
    raw, or DARE'd (seeded by the model's position) then trimmed."""
    rule = MASKS[variant.mask]
    if rule.uses_raw or variant.mask_source == "raw":
        return raw
    tau = dare(raw, variant.dare, variant.dare_seed, index, name) if variant.dare > 0 else raw
    if not variant.uses_trim:
        return tau
    if variant.trim_scope == "global":
        return trim(tau, threshold)
    return trim(tau, tensor_threshold(tau, variant.k, variant.trim_count))


@dataclass(frozen=True)
class CandidateInputs:
    """Everything a worker needs to rebuild one modality at any λ of one K: paths and small values only."""

    base_dir: str
    model_dir: str
    modality: str
    index: int  # the model's position in the merge (DARE's seeds depend on it)
    tau_dir: str  # τ* of this K: the checkpoint's tau_star/ or a scratch copy
    threshold: float | None  # the model's global trim threshold at this K
    variant: Variant
    slots: tuple[Slot, ...]
    private: tuple[PrivateRecord, ...]
    device: str = "cpu"


@dataclass(frozen=True)
class Candidate:
    """One modality at one (λ, K): what a score function receives.

    Attributes:
        modality: the modality's name.
        lambda_: the candidate λ of its mask.
        k: the candidate K of the trim (τ* is this K's).
        inputs: where the weights are read from (internal; picklable, so candidates travel to workers).
    """

    modality: str
    lambda_: float
    k: float
    inputs: CandidateInputs

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
        name, in the base's dtype: exactly what ``mmer merge`` with this λ and K would rebuild."""
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
        return reconstruct(b, stored, MASKS[self.inputs.variant.mask].fn(src, stored.float(), self.lambda_))

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

    def __repr__(self) -> str:
        return f"Candidate({self.modality}, λ={self.lambda_:g}, K={self.k:g})"


# ---------------------------------------------------------------------------------------------------- scorers
@dataclass(frozen=True)
class Scorer:
    """A score by name (``recon``, ``logits``, ``module:function``) or a Python callable, ready to travel."""

    name: str
    target: Any = None  # "module:function" / "file.py:function", or the callable itself
    search_path: tuple[str, ...] = ()  # the caller's sys.path, so workers import the same module
    references: tuple[tuple[str, str], ...] = ()  # logits: modality → file of probe ids and original logits

    @property
    def per_candidate(self) -> bool:
        return self.name != "recon"

    def resolve(self) -> Callable[[Candidate], Any]:
        if callable(self.target):
            return self.target
        for entry in self.search_path:
            if entry not in sys.path:
                sys.path.append(entry)
        return load_callable(self.target)


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:function`` or ``path/to/file.py:function`` → the function (imported, never from a checkpoint)."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"score {spec!r} is neither a built-in score nor MODULE:FUNCTION",
            key="score",
            hint=f"use {', '.join(BUILTIN_SCORES)}, or e.g. my_eval:score or path/to/eval.py:score",
        )
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{module_name}: no such file", file=module_name, key="score", hint="check the path")
        name = f"mmer_score_{path.stem}_{abs(hash(str(path))):x}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            sys.path.insert(0, str(path.parent))
            try:
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as err:
                raise ConfigError(
                    f"{path}: importing it failed ({type(err).__name__}: {err})",
                    file=str(path),
                    key="score",
                    hint="run `python {path}` to see the error",
                ) from None
            finally:
                sys.path.remove(str(path.parent))
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise ConfigError(
                f"score {spec!r}: module {module_name!r} not found ({err})",
                key="score",
                hint="run from the directory holding it, add it to PYTHONPATH, or give path/to/file.py:function",
            ) from None
        except Exception as err:
            raise ConfigError(
                f"score {spec!r}: importing {module_name} failed ({type(err).__name__}: {err})",
                key="score",
                hint=f"run `python -c 'import {module_name}'` to see the error",
            ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(
            f"score {spec!r}: {module_name} has no {attr!r}",
            key="score",
            hint=f"functions there: {', '.join(n for n in dir(module) if not n.startswith('_'))[:200]}",
        )
    if not callable(fn):
        raise ConfigError(
            f"score {spec!r}: {attr} is not callable", key="score", hint="name a function taking one candidate"
        )
    return fn


def _as_score(value: Any, scorer: str, candidate: Candidate) -> tuple[float, dict[str, Any]]:
    details: dict[str, Any] = {}
    if isinstance(value, Mapping):
        details = {str(k): _plain(v) for k, v in value.items() if k != "score"}
        value = value.get("score")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        number = float(value)  # numpy scalars, ints, floats
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise TuneError(
            f"score {scorer} returned {value!r} for {candidate!r}, not a finite number",
            key="score",
            hint="return a float (higher is better), or a mapping with a 'score' float",
        )
    return number, details


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def evaluate(candidate: Candidate, scorer: Scorer) -> dict[str, Any]:
    """Score one candidate (in whichever worker runs it); errors come back as data, raised by the caller."""
    started = time.perf_counter()
    try:
        if scorer.name == "logits":
            references = dict(scorer.references)
            score, details = logit_agreement(candidate, references[candidate.modality])
        else:
            fn = scorer.resolve()
            try:
                value = fn(candidate)
            except MmerError:
                raise
            except Exception as err:
                raise TuneError(
                    f"score {scorer.name} failed on {candidate!r}: {type(err).__name__}: {err}",
                    key="score",
                    hint="run the function on one candidate by hand (backend serial) to debug it",
                ) from None
            score, details = _as_score(value, scorer.name, candidate)
    except MmerError as err:
        return {"error": {"type": type(err).__name__, **err.to_dict()}}
    return {"score": score, "details": details, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ probes
def load_probes(path: str | Path, tokenizer_dir: str | Path | None = None) -> list[list[int]]:
    """Probe inputs: ``.jsonl`` (one per line: a list of token ids, ``{"input_ids": [...]}``, ``{"text": ...}`` or
    a string), ``.json`` (a list of those), or ``.txt`` (one text per line). Text is tokenized with the model's
    own tokenizer (``tokenizer_dir``, local files only, no remote code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such probe file", file=str(path), key="probes", hint="check the path")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_JSON_BYTES} bytes, too large for a probe file",
            file=str(path),
            key="probes",
            hint="probes are a few hundred short inputs",
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})",
            file=str(path),
            key="probes",
            hint="save the file as UTF-8",
        ) from None
    items: list[tuple[int, Any]] = []
    if path.suffix == ".txt":
        items = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        try:
            data = loads_bounded(text, path, what="probe file", error=ConfigError, hint="fix the file, or use .jsonl")
        except ConfigError as err:
            err.key = "probes"
            raise
        if not isinstance(data, list):
            raise ConfigError(
                f"{path}: expected a list of probes",
                file=str(path),
                key="probes",
                hint='e.g. [[1, 2, 3], {"text": "a photo of"}]',
            )
        items = list(enumerate(data, 1))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = loads_bounded(
                    line,
                    path,
                    what=f"the probe on line {n}",
                    error=ConfigError,
                    hint='one probe per line: [1, 2, 3], {"input_ids": [...]} or {"text": "..."}',
                )
            except ConfigError as err:
                err.key = "probes"
                raise
            items.append((n, item))
    tokenizer = None
    probes = []
    for n, item in items:
        if isinstance(item, Mapping):
            item = item.get("input_ids", item.get("text"))
        if isinstance(item, str):
            if tokenizer is None:
                tokenizer = _tokenizer(tokenizer_dir, path)
            item = tokenizer(item)["input_ids"]
        if not (
            isinstance(item, list)
            and item
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item)
        ):
            raise ConfigError(
                f"{path}:{n}: a probe must be a non-empty list of token ids or a text",
                file=str(path),
                key="probes",
                hint='e.g. [1, 2, 3], {"input_ids": [1, 2, 3]} or {"text": "a photo of"}',
            )
        probes.append(list(item))
    if not probes:
        raise ConfigError(f"{path}: holds no probe", file=str(path), key="probes", hint="add one probe per line")
    return probes


def _tokenizer(directory: str | Path | None, probes: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise ConfigError(
            f"{probes}: text probes need the model's tokenizer, which {directory} does not provide ({err})",
            file=str(probes),
            key="probes",
            hint="give token ids instead: one [1, 2, 3] per line",
        ) from None


def _reference_logits(candidate: Candidate, probes: list[list[int]], file: Path) -> None:
    """The original model's logits on every probe, saved beside the probe ids for the workers."""
    from safetensors.torch import save_file

    model = candidate.causal_lm(original=True)
    vocab = model.get_input_embeddings().weight.shape[0]
    tensors = {}
    with torch.no_grad():
        for i, ids in enumerate(probes):
            if max(ids) >= vocab:
                raise ConfigError(
                    f"probe {i + 1} of {candidate.modality} holds token id {max(ids)}, past its vocabulary of {vocab}",
                    key="probes",
                    hint="probe ids must come from this modality's tokenizer",
                )
            x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
            tensors[f"ids_{i}"] = x[0].cpu()
            tensors[f"logits_{i}"] = model(input_ids=x).logits[0].float().cpu().contiguous()
    save_file(tensors, str(file))


def logit_agreement(candidate: Candidate, reference_file: str) -> tuple[float, dict[str, Any]]:
    """−mean KL(p_original ‖ p_rebuilt) over every probe position; details: the KL, top-1 agreement, tokens."""
    from safetensors.torch import load_file

    reference = load_file(reference_file)
    model = candidate.causal_lm()
    device = next(model.parameters()).device
    kl = agree = 0.0
    tokens = 0
    with torch.no_grad():
        for i in range(len(reference) // 2):
            ids = reference[f"ids_{i}"].to(device)
            log_p = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            log_r = torch.log_softmax(reference[f"logits_{i}"].to(device), -1)
            kl += float((log_r.exp() * (log_r - log_p)).sum())
            agree += float((log_r.argmax(-1) == log_p.argmax(-1)).sum())
            tokens += ids.numel()
    return -kl / tokens, {"kl": kl / tokens, "top1": agree / tokens, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class TuneResult:
    modality: str
    k: float
    lambda_: float
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "k": self.k,
            "lambda": self.lambda_,
            "score": self.score,
            "details": self.details,
            "seconds": self.seconds,
        }


@dataclass
class TuneReport:
    """Every candidate's score and the chosen values; :meth:`tuned_recipe` applies them."""

    score: str
    description: str
    modalities: list[str]
    lambdas: list[float]
    ks: list[float]
    results: list[TuneResult]
    best_k: float
    best_lambdas: dict[str, float]
    best_scores: dict[str, float]
    k_scores: dict[float, float]
    current_k: float
    current_lambdas: dict[str, float | None]
    recipe: Recipe
    tau_star_reused: float | None = None
    backend: str = "serial"
    jobs: int = 1
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def table(self, modality: str, k: float) -> dict[float, TuneResult]:
        return {r.lambda_: r for r in self.results if r.modality == modality and r.k == k}

    def tuned_recipe(self) -> Recipe:
        """The input recipe with the chosen K and each tuned modality's chosen λ: ``mmer merge --recipe`` it."""
        models = tuple(
            replace(m, lambda_=self.best_lambdas[m.modality]) if m.modality in self.best_lambdas else m
            for m in self.recipe.models
        )
        return Recipe(self.recipe.base, models, replace(self.recipe.options, k=self.best_k))

    def write_recipe(self, path: str | Path) -> Path:
        path = Path(path)
        header = (
            f"{TUNED_RECIPE_FIRST_WORDS} {__version__} (score: {self.score}, "
            f"{self.description}).\n# Merge with: mmer merge --recipe {path.name} -o merged/\n"
        )
        data = (header + self.tuned_recipe().to_yaml()).encode("utf-8")
        return write_report_file(path, data, TUNED_RECIPE_SIGNATURE, "tuned recipe")

    def write_json(self, path: str | Path) -> Path:
        data = (json.dumps({"format": TUNE_REPORT_FORMAT, **self.to_dict()}, indent=2) + "\n").encode("utf-8")
        return write_report_file(path, data, tune_report_written_by_mmer, "tune report")

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "description": self.description,
            "higher_is_better": True,
            "modalities": self.modalities,
            "grid": {"lambda": self.lambdas, "k": self.ks},
            "best": {
                "k": self.best_k,
                "lambda": self.best_lambdas,
                "score": self.best_scores,
                "k_scores": {f"{k:g}": v for k, v in self.k_scores.items()},
            },
            "current": {"k": self.current_k, "lambda": self.current_lambdas},
            "tau_star_reused_for_k": self.tau_star_reused,
            "results": [r.to_dict() for r in self.results],
            "tuned_recipe": self.tuned_recipe().to_dict(),
            "backend": self.backend,
            "jobs": self.jobs,
            "seconds": self.seconds,
            "warnings": self.warnings,
        }


def write_plot(report: TuneReport, png: str | Path) -> Path:
    """Score vs λ, one panel per modality, one line per K; the chosen (λ, K) is starred."""
    from mmer.inspect import _pyplot

    plt = _pyplot()
    n = len(report.modalities)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), constrained_layout=True, squeeze=False)
    for ax, modality in zip(axes[0], report.modalities, strict=True):
        for k in report.ks:
            rows = sorted(report.table(modality, k).values(), key=lambda r: r.lambda_)
            ax.plot([r.lambda_ for r in rows], [r.score for r in rows], marker="o", label=f"K = {k:g}")
        best = report.table(modality, report.best_k).get(report.best_lambdas[modality])
        if best is not None:
            ax.plot(
                [best.lambda_],
                [best.score],
                marker="*",
                markersize=16,
                color="black",
                linestyle="none",
                label=f"chosen λ = {best.lambda_:g}",
            )
        ax.set_title(modality)
        ax.set_xlabel("λ")
        ax.set_ylabel(f"score: {report.score}")
        ax.legend(fontsize=7)
    fig.suptitle(f"mmer tune: {report.description} (higher is better)", fontsize=9)
    try:
        return save_figure(fig, png, dpi=120)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------ tune
def run_tune(
    recipe: Recipe | None = None,
    *,
    checkpoint: str | Path | None = None,
    sources: Mapping[str, str | Path] | None = None,
    score: str | Callable[[Candidate], Any] = "recon",
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    ks: Sequence[float] | None = None,
    modalities: Sequence[str] | None = None,
    probes: str | Path | Mapping[str, str | Path] | None = None,
    jobs: int = 1,
    backend: str = "auto",
    ray_address: str | None = None,
    workdir: str | Path | None = None,
    device: str | None = None,
    check_sources: bool = True,
    progress: ProgressSink | None = None,
) -> TuneReport:
    """Search λ for each modality (and K over ``ks``) maximising ``score``; see the module docstring.

    Args:
        recipe: the merge to tune (base, models, options), as for ``mmer merge``. Or, instead:
        checkpoint: a decoupled checkpoint: its recipe (options and original models, which tune needs: τᵢ is
            not stored) is tuned and its τ* reused for its own K.
        sources: with ``checkpoint``, where an original model is now, by modality, if not where recorded.
        score: ``recon``, ``logits``, ``module:function``, ``path/file.py:function`` or a callable taking a
            :class:`Candidate` and returning a number (or a mapping with ``score``); higher is better.
        lambdas: the λ grid, tried for every tuned modality.
        ks: the K grid (default: only the recipe's K, i.e. no K search).
        modalities: which modalities to tune (default: all); the others keep their λ.
        probes: for ``logits``: one probe file for every modality, or a file per modality.
        jobs: workers for per-candidate scores.
        backend: ``auto`` (serial for one job, else processes), ``serial``, ``thread``, ``process`` or ``ray``.
        ray_address: a Ray cluster to use with ``backend="ray"`` (default: start a local one, or use the one
            already initialised in this process).
        workdir: where scratch τ* copies and reference logits go, in a temporary subdirectory removed at the
            end (so a candidate of another K than the checkpoint's can be rebuilt only while it is scored).
        device: where the arithmetic runs (default: the recipe's device).
        check_sources: with ``checkpoint``, check each original against the sha256 its manifest recorded.
        progress: receives the streaming passes and the candidates.
    """
    started = time.perf_counter()
    progress = progress or NULL_PROGRESS
    lambdas = _grid(lambdas, "lambdas", lambda v: math.isfinite(v) and v >= 0, "λ must be a finite number ≥ 0")
    if jobs < 1:
        raise ConfigError(f"jobs = {jobs}", key="jobs", hint="jobs ≥ 1")
    if backend not in BACKENDS:
        raise ConfigError(
            f"backend {backend!r} is not one of {', '.join(BACKENDS)}",
            key="backend",
            hint="serial, thread, process or ray",
        )
    scorer = _scorer(score)
    if scorer.name == "logits" and probes is None:
        raise ConfigError(
            "score logits needs probe inputs",
            key="probes",
            hint="pass --probes probes.jsonl (one list of token ids or one text per line)",
        )
    read_recipe, spec_recipe, reuse = _inputs(recipe, checkpoint, sources, device, check_sources)
    options = read_recipe.options
    rule = MASKS.get(options.mask)
    if rule is None or "lambda" not in rule.accepts or rule.rescaled:
        raise ConfigError(
            f"mask rule {options.mask!r} has no λ to tune",
            key="mask",
            hint="tune the mmer (or tall) mask rule; emr is tuning-free and none has no masks",
        )
    ks = _grid(ks if ks is not None else [options.k], "ks", lambda v: 0 < v <= 1, "K is the fraction kept, in (0, 1]")
    if ks != [options.k] and not METHODS[options.method].uses_trim:
        raise ConfigError(
            f"method {options.method} does not trim: K has no effect", key="ks", hint="tune K with method ties"
        )
    names = [m.modality for m in read_recipe.models]
    tuned = list(modalities or names)
    for name in tuned:
        if name not in names:
            raise ConfigError(
                f"modality {name!r} is not in the recipe",
                key="modality",
                hint=f"its modalities are: {', '.join(names)}",
            )
    if backend == "auto":
        backend = "serial" if jobs == 1 or not scorer.per_candidate else "process"

    plan = build_plan(read_recipe)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="mmer-tune-", dir=None if workdir is None else str(workdir)))
    try:
        prepared = _prepare(plan, ks, lambdas, tuned, scorer, reuse, scratch, progress)
        current = {m: plan.lambda_for(m) for m in names}
        candidates = (
            [Candidate(m, lam, k, prepared.inputs[(m, k)]) for m in tuned for k in ks for lam in lambdas]
            if scorer.per_candidate
            else []
        )
        if scorer.name == "logits":
            scorer = replace(scorer, references=_references(plan, tuned, probes, prepared, scratch, progress))
        results = (
            prepared.recon
            if not scorer.per_candidate
            else _run(candidates, scorer, backend, jobs, ray_address, progress)
        )
    finally:
        plan.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report = _choose(results, scorer, tuned, lambdas, ks, options.k, current, spec_recipe)
    report.tau_star_reused = reuse[1] if reuse is not None and reuse[1] in ks else None
    report.backend, report.jobs = backend, jobs
    report.warnings = list(plan.warnings)
    report.seconds = time.perf_counter() - started
    return report


def _grid(values: Sequence[float], key: str, ok: Callable[[float], bool], hint: str) -> list[float]:
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {v!r} is not a number", key=key, hint=hint) from None
        if not ok(v):
            raise ConfigError(f"{key}: {v:g} is out of range", key=key, hint=hint)
        out.append(v)
    if not out:
        raise ConfigError(f"{key}: the grid is empty", key=key, hint="give at least one value")
    return sorted(set(out))


def _scorer(score: str | Callable[[Candidate], Any]) -> Scorer:
    if callable(score):
        return Scorer(getattr(score, "__qualname__", repr(score)), score, tuple(sys.path))
    if score in BUILTIN_SCORES:
        return Scorer(score)
    load_callable(score)  # fail here, before any weight is read
    return Scorer(score, score, tuple(sys.path))


def _inputs(
    recipe: Recipe | None,
    checkpoint: str | Path | None,
    sources: Mapping[str, str | Path] | None,
    device: str | None,
    check: bool,
) -> tuple[Recipe, Recipe, tuple[str, float] | None]:
    """(the recipe to read from, the recipe to write back, (τ* directory, its K) to reuse)."""
    if (recipe is None) == (checkpoint is None):
        raise ConfigError(
            "give either a recipe (base and model YAMLs) or a decoupled checkpoint to tune",
            key="checkpoint",
            hint="mmer tune base.yaml vision.yaml audio.yaml, or mmer tune --checkpoint merged/",
        )
    if recipe is not None:
        if sources:
            raise ConfigError("--source goes with --checkpoint", key="source", hint="edit the model YAMLs instead")
        if device is not None:
            recipe = replace(recipe, options=replace(recipe.options, device=device))
        return recipe, recipe, None
    ckpt = load_decoupled(checkpoint)  # type: ignore[arg-type]
    try:
        if ckpt.is_single_model:
            raise ConfigError(
                f"{checkpoint} is a single merged model: no masks, no λ",
                key="checkpoint",
                hint="tune a checkpoint with masks, or tune from the model YAMLs",
            )
        check_source_names(ckpt, sources)
        options = checkpoint_options(ckpt, device=device)
        read, spec = [], []
        missing = []
        for name in ckpt.modalities:
            explicit = (sources or {}).get(name)
            found = original_spec(ckpt, name, explicit, local_only=False)
            if found is None:
                missing.append(f"{name} ({ckpt.modality(name).source.model})")
                continue
            if check:
                try:
                    resolved = resolve_model(found.model, found.revision)
                except ModelNotFoundError as err:
                    raise ConfigError(
                        f"{name}: {err.message}", file=err.file, key=name, hint=f"pass --source {name}=PATH"
                    ) from None
                problem, _ = source_mismatch(ckpt.modality(name).source, resolved)
                if problem is not None:
                    raise ConfigError(
                        f"{name}: {resolved.path} is not the model {checkpoint} was merged from: {problem}",
                        file=str(resolved.path),
                        key=name,
                        hint="point --source to that model, or pass --no-check-sources",
                    )
            read.append(found)
            spec.append(found if explicit is not None else pinned_spec(name, ckpt.modality(name)))
        if missing:
            raise ConfigError(
                f"tuning needs each modality's original model (τᵢ is not stored in a decoupled checkpoint, so masks "
                f"at another λ cannot be derived from it); not found: {', '.join(missing)}",
                key="source",
                hint="pass --source MODALITY=PATH for each",
            )
        tau_dir = str(ckpt.path / ckpt.manifest.tau_star_dir)  # type: ignore[operator]
        return (
            Recipe(base_read_spec(ckpt), tuple(read), options),
            Recipe(base_spec(ckpt), tuple(spec), options),
            (tau_dir, options.k),
        )
    finally:
        ckpt.close()


@dataclass
class _Prepared:
    inputs: dict[tuple[str, float], CandidateInputs]
    recon: list[dict[str, Any]]


def _prepare(
    plan: MergePlan,
    ks: list[float],
    lambdas: list[float],
    tuned: list[str],
    scorer: Scorer,
    reuse: tuple[str, float] | None,
    scratch: Path,
    progress: ProgressSink,
) -> _Prepared:
    """Global thresholds for every K (two shared passes), then one shared pass that merges each K's τ* (or reads
    the checkpoint's), writes it to ``scratch`` when candidates need it, and scores ``recon`` for every
    candidate. Nothing runs that the score does not need."""
    options = plan.recipe.options
    device = torch.device(options.device)
    variants = {k: resolve_variant(replace(plan.recipe, options=replace(options, k=k))) for k in ks}
    thresholds = find_thresholds(plan, list(variants.values()), progress)
    per_model = {k: thresholds.get(v.threshold_key) if v.needs_global_threshold else None for k, v in variants.items()}
    reuse_k = reuse[1] if reuse is not None and reuse[1] in ks else None
    tau_dirs = {reuse_k: reuse[0]} if reuse_k is not None else {}  # type: ignore[index]
    to_write = [k for k in ks if k != reuse_k] if scorer.per_candidate else []
    recon = not scorer.per_candidate
    labels = [m.label for m in plan.models]
    merged = plan.merged_slots
    rule = MASKS[options.mask]
    error = {(m, k, lam): 0.0 for m in tuned for k in ks for lam in lambdas}
    kept = dict.fromkeys(error, 0)
    norm = dict.fromkeys(tuned, 0.0)
    if to_write or recon:
        writers = {}
        for k in to_write:
            directory = scratch / f"tau_star_k{k:g}"
            directory.mkdir()
            writers[k] = ShardedWriter(
                directory,
                [PlannedTensor(s.name, tau_dtype(plan, s.dtype), s.shape) for s in merged],
                options.shard_size,
                metadata={"format": "mmer-tau-star/1"},
            )
            tau_dirs[k] = str(directory)
        stored_reader = CheckpointReader(reuse[0]) if reuse_k is not None else None  # type: ignore[index]
        stage = "tune: τ* per K" + (" + recon" if recon else "")
        progress.start(stage, sum(s.nbytes for s in merged) * (1 + len(labels)))
        try:
            for slot in merged:
                base, raw = read_slot(plan, slot.name, device)
                base_dev = base.to(device)
                for k in ks:
                    variant = variants[k]
                    if k == reuse_k:
                        stored = stored_reader.get(slot.name).to(device)  # type: ignore[union-attr]
                    else:
                        stored = merge_slot(raw, variant, slot.name, tau_dtype(plan, slot.dtype), per_model[k]).stored
                    if k in writers:
                        writers[k].write(slot.name, stored)
                    if not recon:
                        continue
                    effective = stored.float()
                    for i, label in enumerate(labels):
                        if label not in tuned:
                            continue
                        threshold = per_model[k][i] if per_model[k] else None
                        src = mask_source(raw[i], variant, i, slot.name, threshold)
                        for lam in lambdas:
                            mask = rule.fn(src, effective, lam)
                            rebuilt = reconstruct(base_dev, stored, mask)
                            error[(label, k, lam)] += error_l1(rebuilt, base=base_dev, tau=raw[i])
                            kept[(label, k, lam)] += int(mask.sum())
                for i, label in enumerate(labels):
                    if label in tuned:
                        norm[label] += tau_l1(raw[i])
                progress.advance(stage, slot.nbytes * (1 + len(labels)))
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        finally:
            progress.end(stage)
            if stored_reader is not None:
                stored_reader.close()
    inputs = {}
    for i, m in enumerate(plan.models):
        if m.label not in tuned:
            continue
        for k in ks:
            if k not in tau_dirs:
                continue
            inputs[(m.label, k)] = CandidateInputs(
                base_dir=str(plan.base.path),
                model_dir=str(m.path),
                modality=m.label,
                index=i,
                tau_dir=tau_dirs[k],
                threshold=per_model[k][i] if per_model[k] else None,
                variant=variants[k],
                slots=tuple(plan.slots),
                private=tuple(plan.private[m.label]),
                device=options.device,
            )
    results = []
    if recon:
        total = plan.merged_numel
        for (m, k, lam), err in error.items():
            rel = relative_error(err, norm[m])
            results.append(
                {
                    "modality": m,
                    "k": k,
                    "lambda": lam,
                    "score": -rel,
                    "seconds": 0.0,
                    "details": {"rel_l1": rel, "density": kept[(m, k, lam)] / total if total else 0.0},
                }
            )
    return _Prepared(inputs, results)


def _references(
    plan: MergePlan,
    tuned: list[str],
    probes: str | Path | Mapping[str, str | Path] | None,
    prepared: _Prepared,
    scratch: Path,
    progress: ProgressSink,
) -> tuple[tuple[str, str], ...]:
    files = probes if isinstance(probes, Mapping) else dict.fromkeys(tuned, probes)
    out = []
    stage = "tune: reference logits"
    progress.start(stage, len(tuned), unit="models")
    try:
        for name in tuned:
            if files.get(name) is None:
                raise ConfigError(
                    f"no probes for modality {name!r}",
                    key="probes",
                    hint=f"pass --probes {name}=FILE, or one file for every modality",
                )
            inputs = next(v for (m, _), v in prepared.inputs.items() if m == name)
            candidate = Candidate(name, 0.0, 0.0, inputs)
            file = scratch / f"reference_{name}.safetensors"
            _reference_logits(candidate, load_probes(files[name], candidate.source_dir), file)  # type: ignore[arg-type]
            out.append((name, str(file)))
            progress.advance(stage, 1)
    finally:
        progress.end(stage)
    return tuple(out)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(
    candidates: list[Candidate],
    scorer: Scorer,
    backend: str,
    jobs: int,
    ray_address: str | None,
    progress: ProgressSink,
) -> list[dict[str, Any]]:
    stage = f"tune: {len(candidates)} candidates"
    progress.start(stage, len(candidates), unit="candidates")
    out: list[dict[str, Any] | None] = [None] * len(candidates)
    try:
        if backend == "ray":
            _run_ray(candidates, scorer, jobs, ray_address, out, lambda: progress.advance(stage, 1))
        elif backend == "serial":
            for i, c in enumerate(candidates):
                out[i] = evaluate(c, scorer)
                _raise_error(out[i], c)
                progress.advance(stage, 1)
        else:
            executor: Executor
            if backend == "process":
                if callable(scorer.target):
                    try:
                        pickle.dumps(scorer.target)
                    except Exception as err:
                        raise ConfigError(
                            f"score {scorer.name} cannot be sent to worker processes ({err})",
                            key="score",
                            hint="define it at the top level of a module (module:function), or use backend thread",
                        ) from None
                threads = max(1, (os.cpu_count() or 1) // jobs)
                executor = ProcessPoolExecutor(
                    jobs,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(threads,),
                )
            else:
                executor = ThreadPoolExecutor(jobs)
            with executor:
                futures = {executor.submit(evaluate, c, scorer): i for i, c in enumerate(candidates)}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        out[i] = future.result()
                    except Exception as err:  # the scorer could not reach the worker, or the worker died
                        for f in futures:
                            f.cancel()
                        raise TuneError(
                            f"a {backend} worker failed on {candidates[i]!r}: {type(err).__name__}: {err}",
                            key="score",
                            hint="the score must import in a fresh process: give it as module:function or "
                            "path/file.py:function, or use --backend thread",
                        ) from None
                    if "error" in out[i]:  # type: ignore[operator]
                        for f in futures:
                            f.cancel()
                        _raise_error(out[i], candidates[i])
                    progress.advance(stage, 1)
    finally:
        progress.end(stage)
    return [
        {"modality": c.modality, "k": c.k, "lambda": c.lambda_, **r}  # type: ignore[dict-item]
        for c, r in zip(candidates, out, strict=True)
    ]


def _raise_error(result: dict[str, Any] | None, candidate: Candidate) -> None:
    if result is not None and "error" in result:
        e = result["error"]
        raise TuneError(e["message"], file=e.get("file"), tensor=e.get("tensor"), key=e.get("key"), hint=e.get("hint"))


def _run_ray(
    candidates: list[Candidate],
    scorer: Scorer,
    jobs: int,
    address: str | None,
    out: list[dict[str, Any] | None],
    advance: Callable[[], None],
) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "backend ray needs Ray", key="backend", hint="pip install 'mmer[ray]' (or pip install ray)"
        ) from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            # A local Ray's workers see what this process sees, as spawned processes do: the scorer's module
            # (pickled by reference when importable) must import there too. On a cluster, ship it yourself
            # (runtime_env py_modules / working_dir) and keep models and workdir on shared storage.
            paths = [p for p in (os.environ.get("PYTHONPATH", ""), *scorer.search_path, *sys.path) if p]
            kwargs["num_cpus"] = jobs
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
        ray.init(address=address, **kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(evaluate)
        refs = [remote.remote(c, scorer) for c in candidates]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                try:
                    out[i] = ray.get(ref)
                except Exception as err:  # Ray could not run the task (the score does not import there...)
                    for other in pending:
                        ray.cancel(other)
                    raise TuneError(
                        f"a Ray task failed on {candidates[i]!r}: {type(err).__name__}: {str(err).splitlines()[0]}",
                        key="score",
                        hint="every Ray worker must import mmer and the score's module (runtime_env py_modules) and "
                        "see the models' and workdir's paths",
                    ) from None
                if "error" in out[i]:  # type: ignore[operator]
                    for other in pending:
                        ray.cancel(other)
                    _raise_error(out[i], candidates[i])
                advance()
    finally:
        if started:
            ray.shutdown()


def _choose(
    rows: list[dict[str, Any]],
    scorer: Scorer,
    tuned: list[str],
    lambdas: list[float],
    ks: list[float],
    current_k: float,
    current: dict[str, float | None],
    recipe: Recipe,
) -> TuneReport:
    """Per (modality, K) the best λ; K by the mean over modalities of those bests. Ties go to the value closest
    to the recipe's current one (then the smaller), so a flat score leaves the recipe as it was."""
    results = [
        TuneResult(r["modality"], r["k"], r["lambda"], r["score"], r.get("details", {}), r.get("seconds", 0.0))
        for r in rows
    ]
    by = {(r.modality, r.k, r.lambda_): r for r in results}

    def best_lambda(m: str, k: float) -> float:
        now = current.get(m)
        return max(
            lambdas, key=lambda lam: (by[(m, k, lam)].score, -abs(lam - (now if now is not None else lam)), -lam)
        )

    k_scores = {k: sum(by[(m, k, best_lambda(m, k))].score for m in tuned) / len(tuned) for k in ks}
    best_k = max(ks, key=lambda k: (k_scores[k], -abs(k - current_k), -k))
    best = {m: best_lambda(m, best_k) for m in tuned}
    return TuneReport(
        score=scorer.name,
        description=BUILTIN_SCORES.get(scorer.name, f"{scorer.name} (the caller's score)"),
        modalities=tuned,
        lambdas=lambdas,
        ks=ks,
        results=results,
        best_k=best_k,
        best_lambdas=best,
        best_scores={m: by[(m, best_k, best[m])].score for m in tuned},
        k_scores=k_scores,
        current_k=current_k,
        current_lambdas={m: current.get(m) for m in tuned},
        recipe=recipe,
    )
