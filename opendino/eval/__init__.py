"""Frozen-feature evaluation: batched extraction and (later) the protocols of the paper."""
