"""Data: LLaVA-format records, templates, image preprocessing and the Grain pipeline."""
