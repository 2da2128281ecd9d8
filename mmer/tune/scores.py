"""What a candidate is scored by: the built-in ``logits`` score, or the caller's own function (imported by
name, never from a checkpoint); and the one :func:`evaluate` every backend runs, which hands failures
back as data so that a worker's error reaches the caller with its fields.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.errors import ConfigError, MmerError
from mmer.progress import ProgressSink
from mmer.tune.candidates import Candidate, CandidateInputs
from mmer.tune.errors import TuneError, refused
from mmer.tune.probes import load_probes

BUILTIN_SCORES = {
    "recon": "−relative ℓ1 reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁",
    "logits": "−mean next-token KL(original ‖ rebuilt) on the probes",
}


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
            raise refused(module_name, "no such file", key="score", hint="check the path")
        name = f"mmer_score_{path.stem}_{abs(hash(str(path))):x}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            sys.path.insert(0, str(path.parent))
            try:
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as err:
                raise refused(
                    path,
                    f"importing it failed ({type(err).__name__}: {err})",
                    key="score",
                    hint=f"run `python {path}` to see the error",
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
    """Score one candidate (in whichever worker runs it); errors come back as data, raised by the caller. A joint
    candidate's checkpoint, if the score had it merged, is removed here, in the worker that wrote it."""
    started = time.perf_counter()
    try:
        return _evaluate(candidate, scorer, started)
    finally:
        release = getattr(candidate, "release", None)
        if release is not None:
            release()


def _evaluate(candidate: Candidate, scorer: Scorer, started: float) -> dict[str, Any]:
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


def write_references(
    tuned: list[str],
    probes: str | Path | Mapping[str, str | Path] | None,
    inputs: Mapping[tuple[str, tuple[float, float]], CandidateInputs],
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
            inputs = next(v for (m, _), v in inputs.items() if m == name)
            candidate = Candidate(name, 0.0, 0.0, 0.0, inputs)
            file = scratch / f"reference_{name}.safetensors"
            _reference_logits(candidate, load_probes(files[name], candidate.source_dir), file)  # type: ignore[arg-type]
            out.append((name, str(file)))
            progress.advance(stage, 1)
    finally:
        progress.end(stage)
    return tuple(out)


def make_scorer(score: str | Callable[[Candidate], Any]) -> Scorer:
    if callable(score):
        return Scorer(getattr(score, "__qualname__", repr(score)), score, tuple(sys.path))
    if score in BUILTIN_SCORES:
        return Scorer(score)
    load_callable(score)  # fail here, before any weight is read
    return Scorer(score, score, tuple(sys.path))
