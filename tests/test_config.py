import subprocess
import sys
from pathlib import Path

import pytest

from kvggml.config import SETTINGS, CompressionConfig, ConfigError, Step, markdown_table
from kvggml.library import choose_library

pytestmark = pytest.mark.fast


def test_defaults_when_unset():
    config = CompressionConfig.from_env({})
    assert config == CompressionConfig()
    assert (config.enabled, config.threshold, config.level, config.block_tokens) == (False, 512, 4, 16)


def test_values_are_parsed():
    env = {
        "OLLAMA_KV_COMPRESSION": "1",
        "OLLAMA_KV_COMPRESSION_THRESHOLD": "1024",
        "OLLAMA_KV_COMPRESSION_LEVEL": " 3 ",
        "OLLAMA_KV_COMPRESSION_PRESET": "lo",
        "OLLAMA_KV_COMPRESSION_SINKS": "0",
        "OLLAMA_KV_COMPRESSION_HADAMARD": "0",
    }
    config = CompressionConfig.from_env(env)
    assert config == CompressionConfig(enabled=True, threshold=1024, level=3, preset="lo", sinks=0, hadamard=False)
    assert CompressionConfig.from_env(config.to_env()) == config


def test_hierarchy_settings_are_parsed():
    env = {"OLLAMA_KV_COMPRESSION_SCHEDULE": "2048:6.4.3.3.0, 4096:6.4.3.0.0", "OLLAMA_KV_COMPRESSION_BUDGET": "512MiB"}
    config = CompressionConfig.from_env(env)
    assert config.schedule == (Step(2048, (6, 4, 3, 3, 0)), Step(4096, (6, 4, 3, 0, 0)))
    assert config.ladder() == config.schedule and config.budget == (512 << 20, 0.0)
    assert CompressionConfig.from_env(config.to_env()) == config
    assert CompressionConfig.from_env({"OLLAMA_KV_COMPRESSION_BUDGET": "0.25"}).budget == (0, 0.25)
    assert CompressionConfig.from_env({"OLLAMA_KV_COMPRESSION_BUDGET": "3GB"}).budget == (3 * 10**9, 0.0)
    # a budget without a schedule walks the preset's detail subbands, finest first, at no age
    ladder = CompressionConfig.from_env({"OLLAMA_KV_COMPRESSION_BUDGET": "0.2"}).ladder()
    assert [s.bits for s in ladder] == [(6, 4, 3, 3, 0), (6, 4, 3, 0, 0), (6, 4, 0, 0, 0)]
    assert CompressionConfig.from_env({}).ladder() == ()


def test_keys_and_values_take_presets_of_their_own():
    config = CompressionConfig.from_env(
        {"OLLAMA_KV_COMPRESSION_PRESET": "hi/lo", "OLLAMA_KV_COMPRESSION_BUDGET": "0.2"}
    )
    assert config.codec("k").bits == (8, 7, 6, 5, 4) and config.codec("v").bits == (4, 3, 3, 3, 3)
    # the budget's ladder starts from the wider of the two in each subband; each stream keeps its own widths
    assert [s.bits for s in config.ladder()] == [(8, 7, 6, 5, 0), (8, 7, 6, 0, 0), (8, 7, 0, 0, 0)]
    assert CompressionConfig.from_env({"OLLAMA_KV_COMPRESSION_PRESET": "lo/hi"}).ladder() == ()
    # a schedule may start from either role's widths, no wider than the wider of them
    env = {"OLLAMA_KV_COMPRESSION_PRESET": "balanced/hi", "OLLAMA_KV_COMPRESSION_SCHEDULE": "2048:8.7.6.5.0"}
    assert CompressionConfig.from_env(env).schedule == (Step(2048, (8, 7, 6, 5, 0)),)
    assert CompressionConfig.from_env(config.to_env()) == config


def test_layers_take_presets_of_their_own():
    env = {"OLLAMA_KV_COMPRESSION_LAYERS": " 18=hi/balanced  3,5=fine", "OLLAMA_KV_COMPRESSION_BUDGET": "0.2"}
    config = CompressionConfig.from_env(env)
    assert config.layers == ((3, "fine"), (5, "fine"), (18, "hi/balanced"))
    assert config.codec("k", 18).bits == (8, 7, 6, 5, 4) and config.codec("v", 18).bits == (6, 4, 3, 3, 3)
    assert config.codec("k", 3).bits == (8, 8, 7, 6, 6) and config.codec("k", 4) == config.codec("k")
    assert config.codec("v", None).bits == (6, 4, 3, 3, 3)
    # the budget's ladder starts from the widest of every layer's widths; each stream keeps its own
    assert [s.bits for s in config.ladder()] == [(8, 8, 7, 6, 0), (8, 8, 7, 0, 0), (8, 8, 0, 0, 0)]
    assert CompressionConfig.from_env(config.to_env()) == config
    # a schedule may start from a layer's wider widths, no wider than the widest
    schedule = {"OLLAMA_KV_COMPRESSION_LAYERS": "18=hi", "OLLAMA_KV_COMPRESSION_SCHEDULE": "2048:8.7.6.5.0"}
    assert CompressionConfig.from_env(schedule).schedule == (Step(2048, (8, 7, 6, 5, 0)),)
    with pytest.raises(
        ConfigError, match=r"widens subband 1: .*\(the first: preset balanced's and the layers', widest\)"
    ):
        CompressionConfig.from_env({**schedule, "OLLAMA_KV_COMPRESSION_SCHEDULE": "2048:8.8.6.5.0"})


BAD_LAYERS = "is not LAYERS=PRESET: expected items separated by spaces, LAYERS model layer numbers from 0 to 65535"
BAD_VALUES = [
    ("OLLAMA_KV_COMPRESSION", "2", "out of range: expected an integer from 0 to 1"),
    ("OLLAMA_KV_COMPRESSION", "yes", "is not an integer: expected an integer from 0 to 1"),
    ("OLLAMA_KV_COMPRESSION_THRESHOLD", "-5", "out of range: expected an integer from 0 to 16777216"),
    ("OLLAMA_KV_COMPRESSION_THRESHOLD", "512.5", "is not an integer"),
    ("OLLAMA_KV_COMPRESSION_LEVEL", "0", "out of range: expected an integer from 1 to 6"),
    ("OLLAMA_KV_COMPRESSION_LEVEL", "7", "out of range: expected an integer from 1 to 6"),
    ("OLLAMA_KV_COMPRESSION_PRESET", "max", "is not allowed: expected one of fine, hi, balanced, lo, or two of them"),
    (
        "OLLAMA_KV_COMPRESSION_PRESET",
        "hi/max",
        "is not allowed: expected one of fine, hi, balanced, lo, or two of them",
    ),
    ("OLLAMA_KV_COMPRESSION_PRESET", "hi/lo/lo", "is not allowed: expected one of fine, hi, balanced, lo, or two"),
    ("OLLAMA_KV_COMPRESSION_SCHEDULE", "2048:8.7.6.5.0", "widens subband 0"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "18", f"item '18' {BAD_LAYERS}"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", " ", f"item '' {BAD_LAYERS}"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "5, 11=hi", f"item '5,' {BAD_LAYERS}"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "-1=hi", f"item '-1=hi' {BAD_LAYERS}"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "65536=hi", f"item '65536=hi' {BAD_LAYERS}"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "5,=hi", f"item '5,=hi' {BAD_LAYERS}"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "5=max", "item '5=max': preset 'max' is not allowed: expected one of fine"),
    ("OLLAMA_KV_COMPRESSION_LAYERS", "5=hi 3,5=lo", "names layer 5 twice: each layer takes one preset"),
    ("OLLAMA_KV_COMPRESSION_SINKS", "99999", "out of range: expected an integer from 0 to 4096"),
    ("OLLAMA_KV_COMPRESSION_HADAMARD", "on", "is not an integer: expected an integer from 0 to 1"),
    ("OLLAMA_KV_COMPRESSION_SCHEDULE", "2048", "is not a schedule: expected AGE:WIDTHS steps"),
    ("OLLAMA_KV_COMPRESSION_SCHEDULE", "2048:6.4.3", "expected 5 dot-separated widths (A_L, D_L, ..., D_1)"),
    ("OLLAMA_KV_COMPRESSION_SCHEDULE", "2048:6.4.3.3.1", "each 0 or 2 to 16"),
    ("OLLAMA_KV_COMPRESSION_SCHEDULE", "2048:6.5.3.3.0", "widens subband 1"),
    ("OLLAMA_KV_COMPRESSION_SCHEDULE", "2048:6.4.3.3.0,1024:6.4.3.0.0", "must be older and narrower"),
    ("OLLAMA_KV_COMPRESSION_BUDGET", "lots", "is not a size: expected bytes"),
    ("OLLAMA_KV_COMPRESSION_BUDGET", "12TiB", "is not a size: expected bytes"),
    ("OLLAMA_KV_COMPRESSION_BUDGET", "1.5", "is out of range: expected bytes"),
    ("OLLAMA_KV_COMPRESSION_BUDGET", "0", "is not a size"),
    ("OLLAMA_KV_COMPRESSION_GUIDANCE", "2", "out of range: expected an integer from 0 to 1"),
    ("OLLAMA_KV_COMPRESSION_DIRECT", "2", "out of range: expected an integer from 0 to 1"),
]


@pytest.mark.parametrize("name,value,message", BAD_VALUES)
def test_bad_value_names_variable_value_and_range(name, value, message):
    with pytest.raises(ConfigError) as err:
        CompressionConfig.from_env({name: value})
    assert str(err.value).startswith(f"{name}={value!r} ")
    assert message in str(err.value)


def test_every_setting_has_a_bad_value_test():
    assert {name for name, _, _ in BAD_VALUES} == {s.env for s in SETTINGS.values()}


def test_bad_library_choice():
    with pytest.raises(
        ConfigError, match=r"KVGGML_LIB='patchd' is not allowed: expected one of stock, patched, sanitize, tsan"
    ):
        choose_library({"KVGGML_LIB": "patchd"})


def test_library_choice(tmp_path):
    assert choose_library({"KVGGML_BUILD_DIR": str(tmp_path)}).directory == tmp_path / "patched" / "bin"
    assert choose_library({"KVGGML_LIB": "stock", "KVGGML_BUILD_DIR": str(tmp_path)}).variant == "stock"
    custom = choose_library({"LLAMA_CPP_LIB_PATH": str(tmp_path)})
    assert (custom.variant, custom.directory) == ("custom", tmp_path)


def test_importing_config_loads_no_numpy():
    # the CLI and the library read settings on every start: they must not pay for numpy
    code = "import kvggml.config, sys; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_readme_documents_every_variable():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert markdown_table() in readme
