import pytest
from pydantic import Field

from bench.errors import ConfigError, UsageError
from bench.registry import BACKBONES, DATASETS, METHODS, Params, Registry, load_all


class P(Params):
    width: int = Field(4, ge=1)
    name_of_thing: str = "x"


def make():
    reg = Registry("widget")

    @reg.register("box", P)
    def box(p, scale=1):
        """A box."""
        return ("box", p.width * scale, p.name_of_thing)

    reg.add_preset("big-box", "box", width=10)
    return reg


def test_register_build_and_names():
    reg = make()
    assert reg.names() == ["box"]
    assert reg.all_names() == ["big-box", "box"]
    assert reg.build("box", {"width": 3}, scale=2) == ("box", 6, "x")
    assert reg.build("box") == ("box", 4, "x")


def test_preset_values_under_user_values():
    reg = make()
    assert reg.build("big-box") == ("box", 10, "x")
    assert reg.build("big-box", {"width": 2}) == ("box", 2, "x")
    assert reg.presets("box") == ["big-box"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match=r"unknown widget 'crate'; valid: big-box, box"):
        make().build("crate")


def test_bad_params_name_the_field():
    reg = make()
    with pytest.raises(ConfigError, match=r"widget.width: .*greater than or equal to 1.*got 0"):
        reg.build("box", {"width": 0})
    with pytest.raises(ConfigError, match=r"unknown field 'widget.height'"):
        reg.build("box", {"height": 3})


def test_double_registration_is_an_error():
    reg = make()
    with pytest.raises(ValueError, match="twice"):
        reg.register("box", P)(lambda p: None)


def test_describe_lists_params_and_presets():
    row = make().describe()[0]
    assert row["name"] == "box" and row["doc"] == "A box."
    assert row["params"] == {"width": 4, "name_of_thing": "x"}
    assert row["presets"] == {"big-box": {"width": 10}}


def test_project_registries_are_filled():
    load_all()
    assert "tiny" in BACKBONES.names()
    assert {"digits", "synthetic"} <= set(DATASETS.names())
    assert "uniform" in METHODS.names()
