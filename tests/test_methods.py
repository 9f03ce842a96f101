"""The method registry: every method declares its four flags on the Method base, and register refuses one that does not."""

from dataclasses import dataclass

import pytest
from transformers import LlamaConfig

from flatquant import methods
from flatquant.methods import FLAGS, METHODS, Method, check_model, get_method, register

# name → (trainable, quantizes, needs_stats, learnable_clip)
EXPECTED = {
    "fp16": (False, False, False, False),
    "rtn": (False, True, False, False),
    "flatquant": (True, True, True, True),
    "smoothquant": (False, True, True, False),
    "quarot": (False, True, False, False),
}


def test_flags_are_the_four_declared_on_method():
    assert FLAGS == ("trainable", "quantizes", "needs_stats", "learnable_clip")
    assert not any(hasattr(Method, flag) for flag in FLAGS)  # left unset so that no subclass can forget one


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_declares_its_flags(name):
    method = get_method(name)
    assert isinstance(method, Method) and method.name == name
    flags = tuple(getattr(method, flag) for flag in FLAGS)
    assert all(type(v) is bool for v in flags)
    assert flags == EXPECTED[name]


def test_every_registered_method_is_expected():
    assert set(METHODS) == set(EXPECTED)


def test_base_check_sizes_accepts_any_size_and_transforms_is_abstract():
    check_model(get_method("rtn"), LlamaConfig(hidden_size=4104, intermediate_size=4099, num_attention_heads=12))
    with pytest.raises(NotImplementedError, match="Method does not define transforms"):
        Method().transforms(None, {}, None)


@pytest.fixture
def registry(monkeypatch):
    """A copy of METHODS for one test, so a test registration leaves the real one as it was."""
    monkeypatch.setattr(methods, "METHODS", dict(METHODS))
    return methods.METHODS


def test_register_refuses_a_missing_flag(registry):
    with pytest.raises(TypeError, match="NoClip must set learnable_clip to True or False, got None"):

        @register("no_clip")
        @dataclass
        class NoClip(Method):
            trainable = False
            quantizes = True
            needs_stats = False

    assert "no_clip" not in registry


def test_register_refuses_a_flag_that_is_not_a_bool(registry):
    with pytest.raises(TypeError, match="IntFlag must set trainable to True or False, got 1"):

        @register("int_flag")
        class IntFlag(Method):
            trainable = 1
            quantizes = True
            needs_stats = False
            learnable_clip = False

    assert "int_flag" not in registry


def test_register_refuses_a_class_not_deriving_from_method(registry):
    with pytest.raises(TypeError, match="does not subclass flatquant.methods.Method"):

        @register("loose")
        class Loose:
            trainable = False
            quantizes = True
            needs_stats = False
            learnable_clip = False

    assert "loose" not in registry


def test_register_takes_flags_from_a_parent_method(registry):
    @register("rtn_seeded")
    @dataclass
    class RTNSeeded(methods.RTN):
        seed: int = 0

    assert registry["rtn_seeded"] is RTNSeeded and RTNSeeded.name == "rtn_seeded"
