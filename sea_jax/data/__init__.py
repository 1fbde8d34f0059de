"""Data: LLaVA-format records and templates, images and image paths, sources (JSON, ArrayRecord,
TFDS), mixtures of sources, precomputed labels and the Grain pipeline."""
