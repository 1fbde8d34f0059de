"""Checkpoint converters (Hugging Face, big_vision), one bidirectional mapping per family."""
