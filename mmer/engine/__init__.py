"""The streaming merge engine: the passes over the models' tensors that merge, compare, tune and add share.

Every pass reads one tensor slot (the base's tensor and every model's counterpart) at a time, in chunks on the
CPU, so peak memory is set by the largest tensor, not by the model's depth. The math each pass runs on a slot is
``mmer.merge``'s; this package decides what is read when, and dispatches a chunk to the fused kernels
(``mmer.merge.one_pass``) only where they compute the same bytes as the eager engine.

- :func:`find_thresholds`: each model's exact global top-K magnitude threshold, for every distinct trim asked
  for, in one streaming pass (needed before any slot can be trimmed).
- :func:`count_majority`: the model-wide census of elected signs that ``zero_sign="majority"`` needs, one more
  pass once the thresholds are known (only for variants that ask for it).
- :func:`read_slot`: θ_base and every τᵢ of one slot (or a chunk of it), checked for NaN/inf.
- :func:`merge_slots`: the main pass that writes τ*, the masks, the base copy and the private rows.
- :func:`tau_dtype`: the dtype τ* is stored in.
"""

from mmer.engine.census import count_majority
from mmer.engine.merge_pass import SlotStats, merge_slots
from mmer.engine.slots import read_slot, release_inputs, slot_spans, tau_dtype
from mmer.engine.thresholds import Thresholds, find_thresholds

__all__ = [
    "SlotStats",
    "Thresholds",
    "count_majority",
    "find_thresholds",
    "merge_slots",
    "read_slot",
    "release_inputs",
    "slot_spans",
    "tau_dtype",
]
