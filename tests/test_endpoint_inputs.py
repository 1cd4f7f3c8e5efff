"""The endpoint's parameter and body checks without a server: every /v1/generate field typed before use, texts
bounded and valid, presets by name only, and the negative-prompt cache bounded."""

import re

import pytest

from pipeline.errors import BadInput, BadParameter, TooLarge, kind_of
from pipeline.model.presets import get_preset
from pipeline.stages import UpscaleOptions
from serve.app import check_json_fields, parse_params

PYTHON_SPEAK = re.compile(r"object has no attribute|unhashable|not iterable|can't multiply|can only convert|"
                          r"Error\b|Traceback|NoneType|<class|TextEncodeInput|\^\[")  # fmt: skip


@pytest.mark.parametrize(
    "field,value,message",
    [("quality", float("inf"), "quality must be an integer"), ("seed", 1.5, "seed must be an integer"),
     ("format", {"a": 1}, "format must be a string"), ("format", ["png"], "format must be a string"),
     ("negative_prompt", {}, "negative_prompt must be a string"), ("steps", True, "steps must be an integer"),
     ("shift", "3", "shift must be an integer or a number"), ("cfg_scale", float("nan"), "finite"),
     ("timeout", False, "timeout must be"), ("size", [1e400, 16], "size must be"), ("size", {}, "size must be"),
     ("upscale", 1, "upscale must be true or false"), ("prompt", "a \ud800 cat", "prompt is not valid text"),
     ("negative_prompt", "x" * 5000, "over the limit of 4,000"), ("prompt", ["a cat"], "prompt must be a string")],
)  # fmt: skip
def test_generate_fields_are_typed_before_use(field, value, message):
    with pytest.raises((BadParameter, TooLarge)) as e:
        check_json_fields({"prompt": "a cat", field: value})
    assert message in str(e.value) and not PYTHON_SPEAK.search(str(e.value)), str(e.value)
    assert kind_of(e.value) in ("bad_parameter", "too_large")


def test_generate_json_depth_and_size_are_bounded_before_parsing():
    from pipeline import safejson

    with pytest.raises(BadInput, match="nests 100000 levels"):
        safejson.loads(b"[" * 100_000 + b"]" * 100_000, "the body", 1 << 20, max_depth=4)
    with pytest.raises(TooLarge, match="over the limit"):
        safejson.loads(b" " * 300_000, "the body", 256 << 10)
    assert safejson.loads(b'{"a": "[[[[[[", "b": [1]}', "the body", 100, max_depth=2) == {"a": "[[[[[[", "b": [1]}


def test_query_params_preset_by_name_only_and_texts_checked(tmp_path):
    """A client naming a preset *file* never makes the server read its disk; captions are bounded and valid."""
    preset, opts = get_preset("flux-2k"), UpscaleOptions()
    (tmp_path / "p.json").write_text("{}")
    for bad, message in [({"preset": str(tmp_path / "p.json")}, "serves preset"),
                         ({"caption": "x" * 5000}, "over the limit"), ({"caption": "a \udc80"}, "not valid text"),
                         ({"quality": "1e400"}, "quality must be int"), ({"degrade_sigma": "inf"}, "degrade_sigma"),
                         ({"sigma": "nan"}, "sigma")]:  # fmt: skip
        with pytest.raises((BadParameter, TooLarge), match=message) as e:
            parse_params(bad, preset, opts, False, ("sigma",))
        assert not PYTHON_SPEAK.search(str(e.value))
    assert parse_params({"preset": "flux-2k"}, preset, opts, False) == {}


def test_negative_prompt_embeddings_are_kept_in_a_bounded_lru():
    from pipeline.stages.generate import GenerateStage

    calls = []

    class Captioner:
        def encode(self, texts):
            calls.append(texts[0])
            return texts[0]

    stage = object.__new__(GenerateStage)
    stage.captioner, stage._null = Captioner(), __import__("collections").OrderedDict()
    for i in range(150):
        stage._negative(f"neg {i}")
    assert len(stage._null) == GenerateStage.NEGATIVES_KEPT <= 8
    stage._negative("neg 149")
    assert len(calls) == 150  # the most recent one is still kept


def test_invalid_s3_bucket_name_is_one_sentence():
    from pipeline.errors import SetupError
    from pipeline.storage import Location

    with pytest.raises(SetupError) as e:
        Location("s3://Bad Bucket!/x").bucket_prefix
    assert "invalid S3 bucket name 'Bad Bucket!'" in str(e.value) and "\n" not in str(e.value)
    assert "regex" not in str(e.value) and "^" not in str(e.value)
