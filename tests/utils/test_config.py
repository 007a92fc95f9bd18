"""The YAML-over-dataclasses loader: types, overrides, and errors that name the key."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_rl.utils.config import ConfigError, apply_overrides, load_dataclass, to_dict


@dataclass
class Inner:
    k: int = 20
    kind: Literal["tv", "kl"] = "tv"
    cap: Optional[float] = None

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"`k` must be >= 1, got {self.k}")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    lr: float = 1e-6
    bf16: bool = False
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nlr: 3.0e-6\ninner:\n  kind: kl\n")
    cfg = load_dataclass(Outer, path, ["inner.k=4", "bf16=true", "tags=[a, b]", "inner.cap=5"])
    assert cfg == Outer(steps=5, lr=3e-6, bf16=True, inner=Inner(k=4, kind="kl", cap=5.0), tags=["a", "b"])
    assert to_dict(cfg)["inner"] == {"k": 4, "kind": "kl", "cap": 5.0}
    assert load_dataclass(Outer, {"lr": "1e-6"}).lr == 1e-6  # YAML 1.1 reads 1e-6 as a string


@pytest.mark.parametrize("data, needle", [
    ({"inner": {"kk": 1}}, "unknown config key(s) `inner.kk`; known keys in `inner`: cap, k, kind"),
    ({"stepz": 1}, "unknown config key(s) `stepz`"),
    ({"steps": "ten"}, "`steps` must be an integer"),
    ({"bf16": "yes"}, "`bf16` must be true or false"),
    ({"inner": {"kind": "js"}}, "`inner.kind` = 'js' is not allowed; allowed values: 'tv', 'kl'"),
    ({"inner": {"k": 0}}, "config section `inner`: `k` must be >= 1"),
    ({"inner": 3}, "`inner` must be a mapping"),
])
def test_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError) as err:
        load_dataclass(Outer, data)
    assert needle in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataclass(Outer, tmp_path / "nope.yaml")
    base = {"inner": {"k": 2}}
    assert apply_overrides(base, ["inner.k=3"]) == {"inner": {"k": 3}} and base == {"inner": {"k": 2}}


@dataclass
class WithRequired:
    inner: Inner
    steps: int = 1


def test_required_key_is_named():
    with pytest.raises(ConfigError, match="config key\\(s\\) `inner` required but not given"):
        load_dataclass(WithRequired, {"steps": 2})


@pytest.mark.parametrize("data, needle", [
    ({"lr": float("nan")}, "config key `lr` must be a finite number, got nan"),
    ({"lr": "inf"}, "config key `lr` must be a finite number, got inf"),          # a string, as YAML may give
    ({"lr": 1e400}, "config key `lr` must be a finite number, got inf"),           # overflows to inf
    ({"inner": {"cap": float("-inf")}}, "config key `inner.cap` must be a finite number, got -inf"),  # Optional
])
def test_float_keys_must_be_finite(data, needle):
    with pytest.raises(ConfigError) as err:
        load_dataclass(Outer, data)
    assert needle in str(err.value)


def test_a_caller_may_allow_inf_for_named_keys_but_never_nan(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  cap: .inf\n")
    assert load_dataclass(Outer, path, allow_inf={"inner.cap"}).inner.cap == float("inf")
    with pytest.raises(ConfigError, match="`inner.cap` must be a finite number, got nan"):
        load_dataclass(Outer, {"inner": {"cap": ".nan"}}, ["inner.cap=.nan"], allow_inf={"inner.cap"})
    with pytest.raises(ConfigError, match="`lr` must be a finite number"):   # only the named key
        load_dataclass(Outer, {"lr": "inf"}, allow_inf={"inner.cap"})
