"""Strict config loading: unknown keys, wrong types, --set overrides, YAML float trap."""
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import pytest

from modules.config import apply_overrides, from_dict, load_config, parse_yaml_text, to_dict
from modules.errors import UserError


@dataclass
class Inner:
    learning_rate: float = 1e-4
    total_training_iterations: int = 10
    name: str = "x"
    mode: Literal["hinge", "vanilla"] = "hinge"
    channels: List[int] = field(default_factory=lambda: [1, 2])
    optional: Optional[float] = None


@dataclass
class Outer:
    training_args: Inner = field(default_factory=Inner)
    scaling_constants: Dict[str, float] = field(default_factory=dict)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_scientific_notation_without_dot_is_a_float():
    assert parse_yaml_text("a: 3e-4", "x") == {"a": 3e-4}
    assert parse_yaml_text("a: 1E5", "x") == {"a": 1e5}
    assert parse_yaml_text("a: 1.5", "x") == {"a": 1.5}
    assert parse_yaml_text("a: 12", "x") == {"a": 12}
    assert parse_yaml_text("a: abc", "x") == {"a": "abc"}


def test_loads_nested_dataclass_and_converts_ints_to_floats(tmp_path):
    path = write(tmp_path, "training_args:\n  learning_rate: 3e-4\n  channels: [4, 8]\nscaling_constants:\n  shapes: 1\n")
    cfg = load_config(Outer, path)
    assert cfg.training_args.learning_rate == pytest.approx(3e-4)
    assert cfg.training_args.channels == [4, 8]
    assert cfg.scaling_constants == {"shapes": 1.0}
    assert isinstance(cfg.scaling_constants["shapes"], float)
    assert to_dict(cfg)["training_args"]["total_training_iterations"] == 10


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "training_args:\n  learnin_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(Outer, path)
    message = str(err.value)
    assert str(path) in message and "learnin_rate" in message
    assert "learning_rate" in message and "total_training_iterations" in message
    assert "\n" not in message


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "training_args:\n  total_training_iterations: ten\n")
    with pytest.raises(UserError, match=r"training_args\.total_training_iterations.*must be int.*'ten'"):
        load_config(Outer, path)
    path = write(tmp_path, "training_args:\n  mode: wgan\n")
    with pytest.raises(UserError, match=r"one of 'hinge', 'vanilla'"):
        load_config(Outer, path)
    path = write(tmp_path, "training_args:\n  total_training_iterations: true\n")
    with pytest.raises(UserError, match="must be int"):
        load_config(Outer, path)


def test_set_overrides_parse_values_and_reject_unknown_keys(tmp_path):
    path = write(tmp_path, "training_args:\n  learning_rate: 0.1\n")
    cfg = load_config(Outer, path, ["training_args.learning_rate=1e-4", "training_args.channels=[3, 5]",
                                    "training_args.optional=null", "scaling_constants.celebahq=0.5"])
    assert cfg.training_args.learning_rate == pytest.approx(1e-4)
    assert cfg.training_args.channels == [3, 5]
    assert cfg.scaling_constants == {"celebahq": 0.5}
    with pytest.raises(UserError, match=r"--set training_args\.lr=1.*unknown key 'lr'.*allowed: learning_rate"):
        load_config(Outer, path, ["training_args.lr=1"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(Outer, path, ["training_args.learning_rate"])
    with pytest.raises(UserError, match=r"must be float.*'fast'"):
        load_config(Outer, path, ["training_args.learning_rate=fast"])
    with pytest.raises(UserError, match="not a section"):
        apply_overrides({"training_args": {"learning_rate": 1}}, ["training_args.learning_rate.x=1"], schema=Outer)


def test_missing_and_invalid_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(Outer, write(tmp_path, "training_args: [\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        from_dict(Outer, {"training_args": 3}, "f.yaml")


def test_repeated_keys_and_tabs_are_errors_naming_the_line(tmp_path):
    nested = "training_args:\n  learning_rate: 1.0e-4\n  name: a\n  learning_rate: 3.0e-4\n"
    with pytest.raises(UserError, match=r"cfg\.yaml: duplicate key 'learning_rate' on line 4 \(first given on line 2\)"):
        load_config(Outer, write(tmp_path, nested))
    with pytest.raises(UserError, match=r"--set 'a={x: 1, x: 2}': duplicate key 'x' on line 1"):
        apply_overrides({}, ["a={x: 1, x: 2}"])
    # The same key in two different mappings, and YAML's merge key overriding on purpose, are fine.
    assert parse_yaml_text("a: {x: 1}\nb: {x: 2}\n", "f") == {"a": {"x": 1}, "b": {"x": 2}}
    assert parse_yaml_text("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n", "f")["run"] == {"x": 3, "y": 2}
    with pytest.raises(UserError, match=r"cfg\.yaml: invalid YAML \(line 2, column 1: indented with a tab; YAML "
                                        r"indentation must be spaces\)"):
        load_config(Outer, write(tmp_path, "training_args:\n\tlearning_rate: 1.0e-4\n"))
