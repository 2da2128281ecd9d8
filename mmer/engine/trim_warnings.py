"""What a user must hear about a trim that did nothing: one rule, for every command that merges.

``merge``, ``add``, ``compare``, ``tune`` and ``demo`` all find global trim thresholds through
:func:`mmer.engine.find_thresholds`; each passes what it found here, so the same facts give the same sentences
whichever command ran the math.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def trim_warnings(
    labels: Sequence[str],
    thresholds: Sequence[float | None] | None,
    k: float | Sequence[float],
    tau_l1: Mapping[str, float] | None = None,
    context: str = "",
) -> list[str]:
    """One sentence per model whose task vector is all zero, or whose global trim threshold is 0.

    A threshold of 0 means more than 1 − K of that τᵢ is exactly zero, so TIES' top-K (TIES, arXiv 2306.01708
    §3; MMER, arXiv 2505.17110 §3.1) keeps every moved entry and K changes nothing. Seen on real full
    fine-tunes: the rows of a large vocabulary that no training text used stay exactly unchanged.

    ``thresholds`` are the models' thresholds in ``labels`` order (``None``: no global trim ran); ``tau_l1``,
    when known, the ℓ1 norm of each τᵢ; ``context`` prefixes each threshold sentence (e.g. ``"K=0.6: "`` in a
    tune; an all-zero τᵢ is the same at every K). Thresholds of DARE'd task vectors should not be passed: DARE's
    own zeros (a fraction p of τᵢ) make a zero threshold a property of the options, not of the models. ``k`` is
    one K for every model or each model's own.
    """
    out = []
    ks = [k] * len(labels) if isinstance(k, (int, float)) else list(k)
    for i, label in enumerate(labels):
        if tau_l1 is not None and tau_l1.get(label) == 0.0:
            out.append(
                f"{label}: its LLM equals the base (all-zero task vector): nothing of it was merged; "
                "frozen-LLM models (BLIP-2, Video-LLaMA) need no merge"
            )
        elif thresholds is not None and thresholds[i] == 0.0 and ks[i] < 1:  # K = 1 keeps everything by definition
            out.append(
                f"{context}{label}: the global trim threshold is 0: more than {1 - ks[i]:.0%} of its task "
                "vector is exactly zero (e.g. untouched embedding rows), so trimming removed nothing; "
                "--trim-scope per-tensor trims each tensor by K instead"
            )
    return out
