"""engine.config_values: YAML / command-line values typed by a dataclass field's annotation."""

from __future__ import annotations

import pytest

from diffalign.engine.config_values import base_type, coerce_value
from diffalign.engine.errors import DiffalignError


def test_types_and_optional():
    assert base_type("int | None") == (int, True) and base_type(float) == (float, False)
    assert coerce_value("n", int, "12") == 12 and coerce_value("n", "int | None", "null") is None
    assert coerce_value("x", float, "1e-4") == 1e-4 and coerce_value("x", float, 3) == 3.0
    assert coerce_value("b", bool, "Yes") is True and coerce_value("b", bool, "off") is False
    assert coerce_value("s", str, 5) == "5" and coerce_value("l", "list[str]", "a, b") == ["a", "b"]
    assert coerce_value("l", list[str], [1, "x"]) == ["1", "x"]


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (int, "1.5"),
        (int, 2.5),
        (int, True),
        (float, "nan"),
        (float, "inf"),
        (float, True),
        (bool, "maybe"),
        (str, {"a": 1}),
        ("list[str]", 3),
    ],
)
def test_bad_values_name_the_key(annotation, value):
    with pytest.raises(DiffalignError, match=r"cfg.yaml: the_key: .* is not a valid"):
        coerce_value("the_key", annotation, value, where="cfg.yaml")


def test_null_for_a_required_field():
    with pytest.raises(DiffalignError, match="the_key: a value is required"):
        coerce_value("the_key", int, None)


def test_read_yaml_mapping(tmp_path):
    from diffalign.engine.config_values import read_yaml_mapping

    p = tmp_path / "c.yaml"
    p.write_text("a: 1\nb: [x, y]\n")
    assert read_yaml_mapping(p) == {"a": 1, "b": ["x", "y"]}
    p.write_text("")
    assert read_yaml_mapping(p) == {}
    for text, words in (("- 1\n- 2\n", "mapping"), ("a: [\n", "not valid YAML")):
        p.write_text(text)
        with pytest.raises(DiffalignError, match=words):
            read_yaml_mapping(p)
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DiffalignError, match="not valid YAML"):
        read_yaml_mapping(p)
    with pytest.raises(DiffalignError, match="not found"):
        read_yaml_mapping(tmp_path / "none.yaml")


def test_check_resume_config_names_the_first_key():
    from diffalign.engine.config_values import check_resume_config, config_differences

    saved = {"a": 1, "b": (1, 2), "out": "x", "c": None}
    assert config_differences(saved, {"a": 1, "b": [1, 2], "out": "y", "c": None}, {"out"}) == []
    check_resume_config(saved, {**saved, "out": "z"}, {"out"}, "ck")
    with pytest.raises(DiffalignError, match=r"ck: it was trained with a=1, .* a=2 \(and 1 more"):
        check_resume_config(saved, {**saved, "a": 2, "c": 3}, {"out"}, "ck")
