"""Data curation: embed a raw image pool, deduplicate it, retrieve images near curated seeds, balance by k-means."""
