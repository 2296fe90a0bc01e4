"""Configuration: GPTConfig validation and the generic from_dict machinery."""

from __future__ import annotations

import dataclasses

import pytest

from gptcore.config import ConfigError, GPTConfig, Params, flatten, from_dict, load_params

SIZES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def test_defaults_are_the_reference_model():
    c = GPTConfig()
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (50257, 256, 4, 4, 128)
    assert (c.dropout, c.bias, c.attn_impl) == (0.0, True, "sdpa")


def test_the_pipeline_model_is_gpt2s_with_rotary_and_relu2_however_the_section_is_written():
    # GPTConfig() stays GPT-2's (what a checkpoint without the key and HF export mean)...
    assert (GPTConfig().position, GPTConfig().mlp_activation) == ("learned", "gelu")
    # ...while the pipeline's model, whole or partly written, has rotary positions and ReLU².
    assert Params().model == GPTConfig(position="rope", mlp_activation="relu2")
    for section in ({}, None, {"n_layer": 2}):
        model = Params.from_dict({"model": section}).model
        assert (model.position, model.mlp_activation) == ("rope", "relu2"), section
    assert Params.from_dict({"model": {"n_layer": 2}}).model.n_layer == 2
    assert Params.from_dict({"model": {"position": "learned"}}).model.position == "learned"
    assert Params.from_dict({"model": {"mlp_activation": "gelu"}}).model.mlp_activation == "gelu"
    with pytest.raises(ConfigError, match="model must be a mapping"):
        Params.from_dict({"model": [1]})


def test_to_dict_from_dict_round_trip_and_frozen():
    c = GPTConfig(n_layer=2, n_embd=64, dropout=0.1, attn_impl="math")
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layer = 3


def test_n_embd_must_be_a_multiple_of_n_head():
    with pytest.raises(ConfigError, match=r"n_embd=130 is invalid; allowed: a multiple of n_head=4"):
        GPTConfig(n_embd=130, n_head=4)


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("value", [0, -4])
def test_sizes_must_be_positive(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}={value} is invalid; allowed: a positive integer"):
        GPTConfig(**{name: value})


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_dropout_range(value):
    with pytest.raises(ConfigError, match=r"dropout=.* is invalid; allowed: 0 <= dropout < 1"):
        GPTConfig(dropout=value)


@pytest.mark.parametrize("kwargs, match", [
    ({"attn_impl": "flash"}, r"attn_impl='flash' is invalid; allowed: sdpa \| math"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps=0.0 is invalid"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps='1e-5' is invalid"),
    ({"bias": 1}, "bias=1 is invalid"),
    ({"n_layer": "4"}, "n_layer='4' is invalid; allowed: a positive integer"),
    ({"n_layer": True}, "n_layer=True is invalid"),
])
def test_direct_construction_is_checked_too(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**kwargs)


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        GPTConfig.from_dict({"n_layers": 4})
    msg = str(info.value)
    assert "'n_layers'" in msg
    allowed = msg.split("allowed:")[1]
    for f in dataclasses.fields(GPTConfig):
        assert f.name in allowed


@pytest.mark.parametrize("data, match", [
    ({"n_layer": "4"}, "n_layer must be an integer, got '4'"),
    ({"n_layer": 4.0}, "n_layer must be an integer, got 4.0"),
    ({"n_layer": True}, "n_layer must be an integer, got True"),
    ({"dropout": "0.1"}, "dropout must be a number, got '0.1'"),
    ({"bias": "yes"}, "bias must be true or false, got 'yes'"),
    ({"attn_impl": 1}, "attn_impl must be a string, got 1"),
])
def test_wrong_types_from_dict(data, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig.from_dict(data)


def test_ints_are_accepted_for_floats():
    c = GPTConfig.from_dict({"dropout": 0, "layer_norm_eps": 1})
    assert isinstance(c.dropout, float) and isinstance(c.layer_norm_eps, float)


def test_non_mapping_is_refused():
    with pytest.raises(ConfigError, match="GPTConfig must be a mapping, got \\[4\\]"):
        GPTConfig.from_dict([4])


@pytest.mark.parametrize("data, match", [
    ({"model": {"n_embd": 130}}, r"^model\.n_embd=130 is invalid; allowed: a multiple of n_head=4"),
    ({"model": {"n_embd": "x"}}, r"^model\.n_embd must be an integer, got 'x'"),
    ({"model": {"n_embdd": 1}}, r"^model: unknown key\(s\) 'n_embdd' \(did you mean 'n_embd'\?\); allowed: vocab_size"),
    ({"model": 5}, r"^model must be a mapping, got 5"),
    ({"train": {"batch_size": 0}}, r"^train\.batch_size=0 is invalid"),
    ({"modle": {}}, r"^Params: unknown key\(s\) 'modle' \(did you mean 'model'\?\); allowed: data, tokenizer, model"),
])
def test_params_errors_name_the_section_path(data, match):
    with pytest.raises(ConfigError, match=match):
        Params.from_dict(data)


def test_only_the_patience_error_mentions_patience():
    # The hint belongs to one field; on seed (or threads, warmup) it would mislead.
    with pytest.raises(ConfigError, match=r"^train\.seed=-1 is invalid; allowed: >= 0$") as seed:
        Params.from_dict({"train": {"seed": -1}})
    assert "patience" not in str(seed.value)
    with pytest.raises(ConfigError, match=r"^train\.patience=-1 is invalid; allowed: >= 0 \(0 disables patience\)$"):
        Params.from_dict({"train": {"patience": -1}})


def test_sample_section_is_a_sampling_config_with_prompts():
    """One definition of the sampling settings: the sample stage's section extends it, and
    is validated by generation's module (which the training stages never import)."""
    from gptcore.generation.sampling import SamplingConfig, sample_settings

    p = Params.from_dict({"sample": {"stop": ["\n\n", "END"], "top_k": 0}})
    s = sample_settings(p)
    assert isinstance(s, SamplingConfig)
    assert s.stop == ("\n\n", "END") and s.top_k == 0 and s.prompts
    with pytest.raises(ConfigError, match=r"^params.yaml: sample\.stop must be a list, got 'x'"):
        sample_settings(Params.from_dict({"sample": {"stop": "x"}}))
    with pytest.raises(ConfigError, match=r"^params.yaml: sample\.temperature=-1\.0 is invalid"):
        sample_settings(Params.from_dict({"sample": {"temperature": -1}}))
    with pytest.raises(ConfigError, match=r"^params.yaml: sample: unknown key\(s\) 'topk'"):
        sample_settings(Params.from_dict({"sample": {"topk": 1}}))
    with pytest.raises(ConfigError, match=r"^sample must be a mapping, got 3"):
        Params.from_dict({"sample": 3})


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError,
                       match=r"^train: unknown key\(s\) 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        Params.from_dict({"train": {"learning_rat": 1e-3}})


@pytest.mark.parametrize("data, match", [
    ({"data": {"raw_dir": "d", "processed_dir": "d"}}, r"data\.raw_dir='d' and data\.processed_dir='d' overlap"),
    ({"data": {"processed_dir": "data/raw/p"}},
     r"data\.raw_dir='data/raw' and data\.processed_dir='data/raw/p' overlap"),
    ({"train": {"out_dir": "data"}}, r"and train\.out_dir='data' overlap"),
])
def test_colliding_output_directories_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        Params.from_dict(data)


def test_section_named_like_its_fields_is_still_prefixed():
    """The prefix test is on "<path>.", not on a bare string prefix."""
    @dataclasses.dataclass(frozen=True)
    class Sec:
        n: int = 1

        def __post_init__(self):
            if self.n < 0:
                raise ConfigError(f"n={self.n} is invalid")

    with pytest.raises(ConfigError, match=r"^n\.n=-1 is invalid"):
        from_dict(Sec, {"n": -1}, "n")


def test_flatten():
    assert flatten({"model": {"n_layer": 4, "x": {"y": 1}}, "a": 2}) == {
        "model.n_layer": 4, "model.x.y": 1, "a": 2}


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: file not found"):
        load_params(tmp_path / "params.yaml")


def test_load_params_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  n_layer: [4\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML"):
        load_params(path)


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("3e-4", 0.0003), ("1E-3", 0.001), ("+2e-3", 0.002),
                                         ("1.5e-3", 0.0015), (".5e-3", 0.0005), ("0.001", 0.001)])
def test_exponent_numbers_are_floats_as_dvc_reads_them(tmp_path, text, value):
    """YAML 1.1 (PyYAML) needs a dot for a float; YAML 1.2 (DVC's ruamel) does not: the
    same params.yaml must mean the same run to both."""
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  learning_rate: {text}\n  min_lr: 0\n")
    assert load_params(path).train.learning_rate == value


def test_exponent_integers_are_floats_and_refused_where_an_integer_is_needed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  max_steps: 1e3\n")  # YAML 1.2 (and DVC): the float 1000.0
    with pytest.raises(ConfigError, match=r"train\.max_steps must be an integer, got 1000\.0"):
        load_params(path)


def test_params_yaml_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("train:\n  max_steps: 10\n".encode("utf-16"))  # an editor's "Unicode"
    with pytest.raises(ConfigError, match=r"params.yaml: not UTF-8 text \(byte 0: invalid start byte\); "
                       "save it as UTF-8"):
        load_params(path)


def test_load_params_names_file_and_field(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  n_embd: 130\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model\.n_embd=130 is invalid"):
        load_params(path)
    path.write_text("train:\n  batch_size: '16'\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size must be an integer, got '16'"):
        load_params(path)



@pytest.mark.parametrize("value", ["auto", True, False])
def test_train_compile_is_auto_or_a_yaml_boolean(tmp_path, value):
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  compile: {str(value).lower()}\n")
    assert load_params(path).train.compile == value


@pytest.mark.parametrize("data, match", [
    ({"train": {"compile": "yes"}}, r"^train\.compile='yes' is invalid; allowed: auto \| true \| false"),
    ({"train": {"compile": 1}}, r"^train\.compile must be true or false, got 1"),
    ({"train": {"dtype": "float8"}}, r"^train\.dtype='float8' is invalid; allowed: float32 \| bfloat16 \| float16"),
])
def test_train_compile_and_dtype_errors_name_the_choices(data, match):
    with pytest.raises(ConfigError, match=match):
        Params.from_dict(data)


def test_train_float16_is_a_choice():
    assert Params.from_dict({"train": {"dtype": "float16"}}).train.dtype == "float16"
