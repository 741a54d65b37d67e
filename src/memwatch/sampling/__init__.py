"""Drawing the fixed-seed samples that sample probes share: the plan, DDIM sampling of unconditional models and
classifier-free-guided sampling of text-to-image models."""
