"""Model families: SigLIP towers, decoder LLMs, the adapter and the multimodal wrapper."""
