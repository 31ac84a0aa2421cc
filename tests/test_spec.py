"""align.toml validation: every mistake is one line naming the file and the key, exit code 2."""

import shutil
import subprocess
import sys

import pytest
from conftest import REGISTRY, ROOT

from align.cli import main
from align.errors import ConfigError
from align.registry.load import load_registry


@pytest.fixture
def registry_copy(tmp_path):
    """A writable copy of align.toml (with the weights/ it points to)."""
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    path = tmp_path / "align.toml"
    path.write_text(REGISTRY.read_text())
    return path


def edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_shipped_registry_loads():
    reg = load_registry(REGISTRY)
    spec = reg.get("gemma2")
    assert spec.ci and spec.tolerance.atol == 1e-5 and spec.tolerance.rtol == 1e-5
    tiny = spec.configs["tiny"]
    assert tiny["sliding_window"] < next(t for t in spec.inputs.tensors if t.name == "input_ids").params["seq_len"]
    assert tiny["num_key_value_heads"] < tiny["num_attention_heads"]
    assert tiny["attn_logit_softcapping"] and tiny["final_logit_softcapping"] and tiny["tie_word_embeddings"]
    assert set(tiny["layer_types"]) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize(
    "old,new,key,says",
    [
        ("seq_len = 16", "", "models.gemma2.inputs.input_ids.seq_len", "missing key"),
        ("seq_len = 16", "seq_len = 1.5", "models.gemma2.inputs.input_ids.seq_len", "expected an integer or a string"),
        ("seq_len = 16", 'seq_len = "16"', "models.gemma2.inputs.input_ids.seq_len", "or a config key naming one"),
        ("seq_len = 16", "seq_len = 16\nsequ_len = 3", "models.gemma2.inputs.input_ids.sequ_len", "unknown key"),
        ('kind = "tokens"', 'kind = "tokenz"', "models.gemma2.inputs.input_ids.kind", "unknown kind 'tokenz'"),
        ('of = "input_ids"', 'of = "input_idz"', "models.gemma2.inputs.attention_mask.of", "names no input"),
        ('backward = "loss"', 'backward = "los"', "models.gemma2.inputs.backward", "unknown value 'los'"),
        ("ci = true", 'ci = "yes"', "models.gemma2.ci", "expected a boolean"),
        ("atol = 1e-5", "atol = -1.0", "defaults.tolerance.float32.atol", "must be a finite number >= 0, got -1.0"),
        ("atol = 1e-5", "atol = inf", "defaults.tolerance.float32.atol", "must be a finite number >= 0, got inf"),
        ("atol = 1e-5", "atol = nan", "defaults.tolerance.float32.atol", "must be a finite number >= 0, got nan"),
        ("factor = 2.0\n", "factor = 0.0\n", "defaults.tolerance.float32.factor", "must be a finite number > 0"),
        ('class = "ports.text.gemma2:Gemma2ForCausalLM"', 'class = "ports.text.gemma2"', "models.gemma2.port.class",
         "expected 'module:Class'"),
        ('weights = "weights/gemma2.toml"', 'weights = "weights/nope.toml"', "models.gemma2.weights", "no such file"),
        ("left_pad = [0, 3]", "left_pad = [0, 3, 1]", "models.gemma2.inputs.input_ids.left_pad", "one per sample"),
        ('dtypes = ["float32", "bfloat16"]', 'dtypes = ["float8"]', "defaults.dtypes", "unknown dtype"),
        ("constants = { return_loss = true }", "constants = { return_loss = [true] }",
         "models.clip.inputs.constants.return_loss", "expected a plain value"),
        ("constants = { return_loss = true }", "constants = { pixel_values = 1 }",
         "models.clip.inputs.constants.pixel_values", "is also an input table"),
        ('height = "vision_config.image_size"', 'height = "vision_config..image_size"',
         "models.clip.inputs.pixel_values.height", "dotted for a nested config"),
    ],
)
def test_config_mistakes_name_file_and_key(registry_copy, old, new, key, says):
    edit(registry_copy, old, new)
    with pytest.raises(ConfigError) as e:
        load_registry(registry_copy)
    assert e.value.key == key
    assert says in e.value.message
    assert str(registry_copy) in str(e.value)


def test_unknown_model_lists_known_ones():
    registry = load_registry(REGISTRY)
    with pytest.raises(ConfigError) as e:
        registry.get("nope")
    assert e.value.key == "models.nope"
    assert e.value.message == f"unknown model (known: {', '.join(sorted(registry.models))}; see `align list`)"
    assert "gemma2" in registry.models


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "align.toml"
    bad.write_text("[models\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_registry(bad)


def test_unknown_config_field_is_refused(registry_copy, capsys):
    edit(registry_copy, "sliding_window = 6", "sliding_window = 6\nsliding_windw = 6")
    code = main(["--registry", str(registry_copy), "run", "gemma2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"align: error: {registry_copy}: models.gemma2.configs.tiny.sliding_windw: "
                   "Gemma2Config has no such field")


def test_unknown_config_name(capsys):
    code = main(["--registry", str(REGISTRY), "run", "gemma2", "--config", "huge", "--quiet"])
    assert code == 2
    assert "models.gemma2.configs.huge: unknown config (known: full, mid, tiny" in capsys.readouterr().err


def test_cli_error_is_one_line_without_traceback(registry_copy):
    """As a user sees it: a subprocess, exit code 2, a single stderr line."""
    edit(registry_copy, "seq_len = 16", 'seq_len = 1.5')
    proc = subprocess.run([sys.executable, "-m", "align", "--registry", str(registry_copy), "run", "gemma2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"align: error: {registry_copy}: models.gemma2.inputs.input_ids.seq_len: expected an integer or "
                     "a string, got a number 1.5"]


def test_list(capsys):
    assert main(["--registry", str(REGISTRY), "list"]) == 0
    assert capsys.readouterr().out.startswith("gemma2\tci\t")
