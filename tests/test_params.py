import pytest

from llmkit.errors import InvalidParams
from llmkit.params import GenerationParams, parse_params


def test_defaults_come_from_one_place():
    params = parse_params({})
    assert params == GenerationParams()
    assert params.max_new_tokens == GenerationParams.model_fields["max_new_tokens"].default


def test_none_means_not_given():
    assert parse_params(temperature=None, top_k=None).temperature == GenerationParams().temperature


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"temperature": 5}, "temperature", "temperature must be between 0.0 and 2.0 (got 5)"),
        ({"top_p": 0}, "top_p", "top_p must be greater than 0.0 and at most 1.0 (got 0)"),
        ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be between 1 and 4096 (got 0)"),
        ({"top_k": -1}, "top_k", "top_k must be between 0 and 100000 (got -1)"),
        ({"repetition_penalty": 3.0}, "repetition_penalty", "repetition_penalty must be between 0.5 and 2.0"),
        ({"seed": -1}, "seed", "seed must be between 0 and"),
        ({"num_sequences": 17}, "num_sequences", "num_sequences must be between 1 and 16 (got 17)"),
        ({"temperature": "hot"}, "temperature", "temperature must be a number (got 'hot')"),
        ({"colour": "red"}, "colour", "unknown parameter 'colour'"),
        ({"stop": [""]}, "stop", "stop sequences must not be empty"),
        ({"stop": ["x"] * 9}, "stop", "stop takes at most 8 sequences"),
        ({"greedy": True, "num_sequences": 2}, "num_sequences", "num_sequences must be 1 with greedy"),
        ({"temperature": 0, "num_sequences": 3}, "num_sequences", "num_sequences must be 1 with greedy"),
    ],
)
def test_bad_values_name_the_parameter_and_range(values, field, message):
    with pytest.raises(InvalidParams) as caught:
        parse_params(values)
    assert caught.value.field == field
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_temperature_zero_is_greedy():
    assert parse_params(temperature=0).is_greedy
    assert not parse_params(temperature=0.5).is_greedy


def test_every_bad_field_is_reported_in_field_order():
    with pytest.raises(InvalidParams) as caught:
        parse_params({"top_k": -1, "temperature": 5.0, "stop": ["a", 1, 2], "colour": "red"})
    assert caught.value.errors == [
        ("temperature", "temperature must be between 0.0 and 2.0 (got 5.0)"),
        ("top_k", "top_k must be between 0 and 100000 (got -1)"),
        ("stop", "stop must be a list of strings (got 1 in it)"),  # one sentence per field, its first error
        ("colour", "unknown parameter 'colour' (known: " + ", ".join(GenerationParams.model_fields) + ")"),
    ]
    assert caught.value.field == "temperature"
    assert str(caught.value) == "; ".join(message for _, message in caught.value.errors)
    assert "\n" not in str(caught.value)


def test_every_inconsistency_is_reported():
    with pytest.raises(InvalidParams) as caught:
        parse_params({"greedy": True, "num_sequences": 2, "stop": [""]})
    assert [field for field, _ in caught.value.errors] == ["stop", "num_sequences"]
    assert str(caught.value).startswith("stop sequences must not be empty strings; num_sequences must be 1 with greedy")
    assert "\n" not in str(caught.value)


def test_one_bad_field_is_one_error():
    with pytest.raises(InvalidParams) as caught:
        parse_params(temperature=5.0)
    assert caught.value.errors == [("temperature", str(caught.value))]
    assert InvalidParams("x", field="y").errors == [("y", "x")]
