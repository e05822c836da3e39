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


def test_check_task_config_free_keys_unknown_keys_and_missing_record():
    """The trainers' `check_resume` (engine.checkpoints.check_task_config): keys free on resume
    as a set or from both configs, keys not known yet, a checkpoint recording no configuration."""
    from diffalign.engine.checkpoints import check_task_config

    saved = {"lr": 1e-4, "rank": 4, "out": "a", "dim": 8}
    check_task_config(saved, {**saved, "out": "b"}, "ck", {"out"})
    check_task_config(saved, {**saved, "dim": None}, "ck", {"out"}, unknown=("dim",))
    with pytest.raises(DiffalignError, match=r"^cannot resume from ck: it was trained with rank=4"):
        check_task_config(saved, {**saved, "rank": 8, "dim": None}, "ck", {"out"}, ("dim",))

    def free(old: dict, new: dict) -> set[str]:  # like fill's: lr free only when both agree
        return {"lr"} if old.get("rank") == new.get("rank") else set()

    check_task_config(saved, {**saved, "lr": 2e-4}, "ck", free)
    with pytest.raises(DiffalignError, match=r"lr=0.0001, this configuration has lr=0.0002 \(and"):
        check_task_config(saved, {**saved, "lr": 2e-4, "rank": 8}, "ck", free)
    check_task_config(None, saved, "ck", {"out"})  # written before the field existed: resumes
    with pytest.raises(DiffalignError, match=r"^cannot resume from ck: it records no X$"):
        check_task_config(None, saved, "ck", {"out"}, missing="it records no X")


def test_read_config_file_base_unknown_keys_and_overrides(tmp_path):
    from dataclasses import dataclass

    from diffalign.engine.config_values import field_types, read_config_file, typed_overrides

    @dataclass
    class Schema:
        lora_rank: int = 8
        lr: float = 1e-4
        layers: list[str] | None = None

    types_ = field_types(Schema)
    assert types_ == {"lora_rank": int, "lr": float, "layers": list[str] | None}
    (tmp_path / "track.yaml").write_text("lora_rank: 4\nlr: 0.001\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "ablation.yaml"
    child.write_text("base: ../track.yaml\nlora-rank: 16\nlayers: [a, b]\n")
    assert read_config_file(child, types_) == {"lora_rank": 16, "lr": 0.001, "layers": ["a", "b"]}
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(DiffalignError, match="cycle"):
        read_config_file(tmp_path / "a.yaml", types_)
    (tmp_path / "typo.yaml").write_text("base: track.yaml\nlora_rnak: 3\n")
    with pytest.raises(
        DiffalignError, match=r"typo.yaml: unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\)"
    ):
        read_config_file(tmp_path / "typo.yaml", types_)
    (tmp_path / "bad.yaml").write_text("base: track.yaml\nlr: nan\n")
    with pytest.raises(DiffalignError, match=r"bad.yaml: lr: 'nan' is not a valid float"):
        read_config_file(tmp_path / "bad.yaml", types_)
    (tmp_path / "nobase.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(DiffalignError, match="not found"):
        read_config_file(tmp_path / "nobase.yaml", types_)
    assert typed_overrides(types_, {"lora-rank": "2", "layers": "null"}) == {
        "lora_rank": 2,
        "layers": None,
    }
    with pytest.raises(DiffalignError, match=r"override: unknown key 'zzz' \(known: layers, lo"):
        typed_overrides(types_, {"zzz": "1"})
    with pytest.raises(DiffalignError, match=r"--lora-rank: lora_rank: 'x' is not a valid int"):
        typed_overrides(types_, {"lora_rank": "x"})


def test_call_arguments_are_the_call_with_its_defaults():
    import inspect

    from diffalign.engine.config_values import call_arguments

    def fn(model, root, out, *, batch_size=4, settings=None, **extra):
        return None

    got = call_arguments(fn, None, "r", "o", settings=3, other=1)
    assert got == {
        "model": None, "root": "r", "out": "o", "batch_size": 4, "settings": 3,
        "extra": {"other": 1},
    }  # fmt: skip
    ref = inspect.signature(fn).bind(None, "r", "o", settings=3, other=1)
    ref.apply_defaults()
    assert got == dict(ref.arguments)
    with pytest.raises(TypeError):
        call_arguments(fn, None, "r")
