"""MoExtend: extend a pretrained Mixture-of-Experts LLM with new experts for a new modality or task."""
