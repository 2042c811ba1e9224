"""`--method-option NAME.KEY=VALUE` and `--grid NAME.KEY=V1,V2` as text: values, tuples, refusals."""

from __future__ import annotations

import pytest

from hetcache.errors import UserError
from hetcache.options import (
    parse_grids,
    parse_method_options,
    parse_value,
    split_top_level,
)

METHODS = ("teacache", "pab", "adacache", "hetcache")


def test_values_are_literals():
    assert [parse_value(t) for t in ("3", "0.05", "1e-3", "true", "False", "none", "null", "kmeans")] == [
        3, 0.05, 1e-3, True, False, None, None, "kmeans"]
    assert parse_value("[100, 800]") == [100, 800] and parse_value("{0.08: 6, 1.0: 1}") == {0.08: 6, 1.0: 1}
    assert parse_value("'F,R'") == "F,R"
    with pytest.raises(UserError, match="cannot read the value"):
        parse_value("[1, 2")
    with pytest.raises(UserError, match="empty"):
        parse_value(" ")


def test_commas_split_only_at_the_top_level():
    assert split_top_level("1,[2,3],'a,b',{4: 5, 6: 7}") == ["1", "[2,3]", "'a,b'", "{4: 5, 6: 7}"]


def test_method_options_parse_into_a_dict_per_method():
    options = parse_method_options(
        ["teacache.delta=0.2", "pab.timestep_window=0,1000", "teacache.warmup_steps=2", "teacache.delta=0.3"],
        METHODS)
    assert options == {"teacache": {"delta": 0.3, "warmup_steps": 2}, "pab": {"timestep_window": (0, 1000)}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("teacache.delta", "is not NAME.KEY=VALUE"),
        ("teacache=0.1", "is not NAME.KEY=VALUE"),
        (".delta=0.1", "is not NAME.KEY=VALUE"),
        ("teacache.delta=", "is not NAME.KEY=VALUE"),
        ("tea.delta=0.1", "unknown method 'tea': use one of teacache, pab, adacache, hetcache"),
    ],
)
def test_malformed_options_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_method_options([text], METHODS)


def test_grids_list_the_values_per_key():
    grids = parse_grids(["teacache.delta=0.03,0.05,0.1", "pab.timestep_window=[0,1000],[100,800]",
                         "pab.self_attention_range=2,4"], METHODS)
    assert grids == {"teacache": {"delta": [0.03, 0.05, 0.1]},
                     "pab": {"timestep_window": [[0, 1000], [100, 800]], "self_attention_range": [2, 4]}}
    with pytest.raises(UserError, match="gives no value"):
        parse_grids(["teacache.delta= , "], METHODS)
    with pytest.raises(UserError, match="--grid 'x.delta=1': unknown method"):
        parse_grids(["x.delta=1"], METHODS)
