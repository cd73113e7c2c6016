"""Multi-LoRA on device: slot pool (A/B buffers allocated once), per-step metadata, wrapped layers."""
