"""A score function for `mmer tune --score examples/add_and_tune/score.py:agreement`.

`mmer tune` calls it once per candidate (one modality at one λ and K) and keeps the λ (and K) with the highest
return value. A real one would run the modality's held-out split, e.g. with
`candidate.save_pretrained(tmp)` and the evaluation harness you trust, and return its accuracy. This one stays
self-contained: the share of greedy next tokens on fixed prompts where the rebuilt LLM agrees with the original
model, with the mean KL divergence as a tie-breaker, and returns both so the JSON keeps them.
"""

from __future__ import annotations

import torch

PROMPTS = [[1, 17, 42, 99, 5, 230, 64, 7], [300, 12, 12, 45, 411, 3, 88, 150, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]


def agreement(candidate) -> dict[str, float]:
    rebuilt = candidate.causal_lm()
    original = candidate.causal_lm(original=True)
    same = kl = tokens = 0.0
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            log_p = torch.log_softmax(original(input_ids=x).logits[0].float(), -1)
            log_q = torch.log_softmax(rebuilt(input_ids=x).logits[0].float(), -1)
            same += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            tokens += len(ids)
    return {"score": same / tokens - kl / tokens, "top1": same / tokens, "kl": kl / tokens}
