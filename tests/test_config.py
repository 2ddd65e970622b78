"""config.load: YAML + overrides into frozen dataclasses, with errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from opendino.config import ConfigError, ExtractConfig, QuickstartConfig, field_docs, load, parse_overrides, to_dict


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: debug\ndata: imgs\nout: o\nbatch_size: 8\nfull_image: [28, 42]\n")
    cfg = load(ExtractConfig, path, ["batch_size=16", "amp=none"])
    assert cfg.batch_size == 16 and cfg.amp == "none" and cfg.full_image == (28, 42)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3  # type: ignore[misc]
    assert to_dict(cfg)["full_image"] == [28, 42]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("shard_sise=3", "did you mean 'shard_size'"),
        ("batch_size=3.5", "batch_size=3.5: expected int"),
        ("cls=yes please", "expected bool"),
        ("full_image=[1, 2, 3]", "expected 2 values"),
        ("format=parquet", "expected one of"),
        ("save_dtype=bfloat16", "needs format=safetensors"),
        ("batch_size=0", "must be positive"),
        ("nonsense", "expected key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    base = ["backbone=debug", "data=x", "out=y"]
    if override.startswith("save_dtype"):
        base.append("format=npy")
    with pytest.raises(ConfigError, match=message):
        load(ExtractConfig, None, [*base, override])


def test_missing_required_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'out'"):
        load(ExtractConfig, None, ["backbone=debug", "data=x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load(ExtractConfig, bad)


def test_int_promotes_to_float_and_none_is_allowed_where_typed():
    cfg = load(ExtractConfig, None, ["backbone=debug", "data=x", "out=y", "full_image=null"])
    assert cfg.full_image is None


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=text"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "text"}


def test_every_field_is_documented():
    for schema in (ExtractConfig, QuickstartConfig):
        docs = field_docs(schema)
        assert set(docs) == {f.name for f in dataclasses.fields(schema)}, schema.__name__
