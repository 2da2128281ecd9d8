"""Where per-candidate scores run: in order, on threads, in spawned worker processes (each with its share of
the cores) or as Ray tasks. Every backend runs :func:`mmer.tune.scores.evaluate` and stops at the first
failure, raised with the candidate it failed on.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Any

import torch

from mmer.errors import ConfigError
from mmer.progress import ProgressSink
from mmer.tune.candidates import Scored
from mmer.tune.errors import TuneError
from mmer.tune.scores import Scorer, evaluate

BACKENDS = ("auto", "serial", "thread", "process", "ray")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_candidates(
    candidates: Sequence[Scored],
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
                    # the scorer could not reach the worker, or the worker died
                    out[i] = _collect(
                        future.result,
                        lambda: [f.cancel() for f in futures],
                        candidates[i],
                        f"a {backend} worker failed",
                        "the score must import in a fresh process: give it as module:function or "
                        "path/file.py:function, or use --backend thread",
                    )
                    progress.advance(stage, 1)
    finally:
        progress.end(stage)
    return [{**c.fields(), **r} for c, r in zip(candidates, out, strict=True)]  # type: ignore[dict-item]


def _collect(
    get: Callable[[], dict[str, Any]],
    cancel: Callable[[], object],
    candidate: Scored,
    failure: str,
    hint: str,
    *,
    first_line: bool = False,
) -> dict[str, Any]:
    """One worker's result; at the first failure every other task is cancelled and the failure raised: the
    backend's (``failure``, with the exception's text or its ``first_line``) or the score's own, with its fields."""
    try:
        result = get()
    except Exception as err:
        cancel()
        reason = str(err).splitlines()[0] if first_line else str(err)
        raise TuneError(
            f"{failure} on {candidate!r}: {type(err).__name__}: {reason}", key="score", hint=hint
        ) from None
    if "error" in result:
        cancel()
        _raise_error(result, candidate)
    return result


def _cancel_tasks(ray: Any, refs: list[Any]) -> None:
    for ref in refs:
        ray.cancel(ref)


def _raise_error(result: dict[str, Any] | None, candidate: Scored) -> None:
    if result is not None and "error" in result:
        e = result["error"]
        raise TuneError(e["message"], file=e.get("file"), tensor=e.get("tensor"), key=e.get("key"), hint=e.get("hint"))


def _run_ray(
    candidates: Sequence[Scored],
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
            "backend ray needs Ray", key="backend", hint="pip install 'mmer-merge[ray]' (or pip install ray)"
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
                # Ray could not run the task (the score does not import there...)
                out[i] = _collect(
                    functools.partial(ray.get, ref),
                    functools.partial(_cancel_tasks, ray, pending),
                    candidates[i],
                    "a Ray task failed",
                    "every Ray worker must import mmer and the score's module (runtime_env py_modules) and "
                    "see the models' and workdir's paths",
                    first_line=True,
                )
                advance()
    finally:
        if started:
            ray.shutdown()
