"""Inference on a decoupled checkpoint: rebuild one modality, route whole models, route per token."""
