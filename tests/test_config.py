"""The validated configuration: params.yaml is checked before any stage runs.

Errors name the file, the key path (``stream.digits.train.epochs``) and, where the
values are a fixed set, the allowed values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO_ROOT, small_params, small_task, write_params
from drape.cli import main
from drape.config import INIT_STAGE, ConfigError, load_config, parse_config


def load_error(tmp_path: Path, params: dict) -> str:
    """Write ``params`` to tmp_path/params.yaml and return the ConfigError message of loading it."""
    write_params(tmp_path, params)
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "params.yaml")
    return str(error.value)


def error_for_text(tmp_path: Path, text: str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    return str(error.value)


# ---------------------------------------------------------------------------
# Valid files


def test_repository_params_load():
    config = load_config(REPO_ROOT / "params.yaml")

    assert config.task_names == ["digits", "fashion", "color", "parity", "shape"]
    assert config.stream["digits"].after == INIT_STAGE
    assert [config.stream[name].after for name in config.task_names[1:]] == config.task_names[:-1]
    assert config.models.preset == "embedded"
    assert config.drape.hidden % config.drape.heads == 0


def test_small_params_load():
    config = parse_config(small_params())

    assert config.task_names == ["digits", "parity"]
    assert config.models.preset == "tiny"
    assert config.models.patch_grid == 2
    assert config.drape.hidden == 32


def test_optional_sections_default():
    config = parse_config({"stream": {"digits": small_task("digits-classify", INIT_STAGE)}})

    assert config.seed == 0
    assert config.models.preset == "embedded"
    assert config.drape.hidden == 256
    assert config.drape.heads == 4
    assert config.evaluate.batch_size == 16
    assert config.evaluate.caption_metric == "CIDEr"


def test_task_lookup():
    config = parse_config(small_params())

    assert config.task("parity").after == "digits"
    assert config.task("parity").data.kind == "digits-parity"


def test_task_lookup_unknown_lists_stream():
    config = parse_config(small_params())

    with pytest.raises(ConfigError) as error:
        config.task("nope")

    assert "unknown task 'nope'" in str(error.value)
    assert "digits, parity" in str(error.value)


# ---------------------------------------------------------------------------
# Invalid keys and values


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("drape", {"hiden": 64}, "drape.hiden"),
        ("models", {"preset": "tiny", "patch_grids": 2}, "models.patch_grids"),
        ("evaluation", {"batch_size": 4}, "evaluation"),
    ],
)
def test_unknown_key(tmp_path, section, values, key):
    message = load_error(tmp_path, small_params(**{section: values}))

    assert message.startswith(f"{tmp_path / 'params.yaml'}: invalid configuration")
    assert f"  {key}: unknown key; remove it or check its spelling" in message


def test_unknown_task_key(tmp_path):
    params = small_params()
    params["stream"]["digits"]["train"]["epoch"] = 3

    message = load_error(tmp_path, params)

    assert "  stream.digits.train.epoch: unknown key" in message


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("stream", "digits", "train", "epochs"), "two", "valid integer"),
        (("stream", "digits", "train", "generator_lr"), "fast", "valid number"),
        (("drape", "nullspace"), "sometimes", "valid boolean"),
        (("drape",), 5, "valid dictionary"),
    ],
)
def test_wrong_type(tmp_path, path, value, expected):
    params = small_params()
    section = params
    for part in path[:-1]:
        section = section[part]
    section[path[-1]] = value

    message = load_error(tmp_path, params)

    assert f"  {'.'.join(path)}: " in message
    assert expected in message
    assert f"got {value!r}" in message


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.2 (as DVC reads params.yaml) makes 1e-3 a float; YAML 1.1 would make it a string.
    params = small_params()
    write_params(tmp_path, params)
    path = tmp_path / "params.yaml"
    path.write_text(path.read_text().replace("generator_lr: 0.001", "generator_lr: 1e-3", 1))
    assert "generator_lr: 1e-3" in path.read_text()
    config = load_config(path)
    assert config.stream["digits"].train.generator_lr == 0.001


def test_preset_lists_allowed(tmp_path):
    message = load_error(tmp_path, small_params(models={"preset": "huge"}))

    assert "  models.preset: got 'huge'; allowed values:" in message
    assert "'embedded'" in message
    assert "'tiny'" in message


def test_caption_metric_lists_allowed(tmp_path):
    message = load_error(tmp_path, small_params(evaluate={"caption_metric": "cider"}))

    allowed = "'BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR', 'ROUGE-L' or 'CIDEr'"
    assert f"  evaluate.caption_metric: got 'cider'; allowed values: {allowed}" in message


def test_caption_metric_accepts_each_name():
    from drape.scorers import CAPTION_METRICS

    for name in CAPTION_METRICS:
        assert parse_config(small_params(evaluate={"caption_metric": name})).evaluate.caption_metric == name


def test_negative_n_train(tmp_path):
    params = small_params()
    params["stream"]["digits"]["data"]["n_train"] = -5

    message = load_error(tmp_path, params)

    assert "  stream.digits.data.n_train: Input should be greater than or equal to 1" in message


def test_patch_grid_out_of_range(tmp_path):
    message = load_error(tmp_path, small_params(models={"preset": "tiny", "patch_grid": 0}))

    assert "  models.patch_grid: Input should be greater than or equal to 1" in message


def test_heads_must_divide_hidden(tmp_path):
    message = load_error(tmp_path, small_params(drape={"hidden": 32, "heads": 3}))

    assert "  drape: heads (3) must divide hidden (32)" in message
    assert "allowed heads for hidden 32: 1, 2, 4, 8, 16, 32" in message
    assert "Value error" not in message


def test_missing_required_key(tmp_path):
    params = small_params()
    del params["stream"]["parity"]["data"]["kind"]

    message = load_error(tmp_path, params)

    assert "  stream.parity.data.kind: Field required" in message


def test_unknown_task_kind(tmp_path):
    params = small_params()
    params["stream"]["parity"]["data"]["kind"] = "digits-parrity"

    message = load_error(tmp_path, params)

    assert message.startswith(f"{tmp_path / 'params.yaml'}: stream.parity.data.kind: got 'digits-parrity'")
    assert "allowed values: digits-classify, digits-parity, fashion-choice" in message


# ---------------------------------------------------------------------------
# The stream's order


@pytest.mark.parametrize(
    ("task", "after", "expected"),
    [
        ("parity", "nope", "digits"),
        ("parity", INIT_STAGE, "digits"),
        ("digits", "parity", INIT_STAGE),
    ],
)
def test_broken_after_chain(tmp_path, task, after, expected):
    params = small_params()
    params["stream"][task]["after"] = after

    message = load_error(tmp_path, params)

    assert f"  stream.{task}.after is '{after}' but must be '{expected}'" in message
    assert "Value error" not in message


def test_reserved_init_name(tmp_path):
    stream = {
        INIT_STAGE: small_task("digits-classify", INIT_STAGE),
        "parity": small_task("digits-parity", INIT_STAGE),
    }

    message = load_error(tmp_path, small_params(stream=stream))

    assert f"  stream.{INIT_STAGE}: the task name '{INIT_STAGE}' is reserved" in message
    assert "rename the task" in message


@pytest.mark.parametrize("name", ["../evil", "a.b", "train@x", "-lead", "with space"])
def test_invalid_task_name(tmp_path, name):
    stream = {name: small_task("digits-classify", INIT_STAGE)}

    message = load_error(tmp_path, small_params(stream=stream))

    assert f"invalid task name {name!r}; use letters, digits, '-' and '_'" in message


def test_empty_stream(tmp_path):
    params = small_params()
    params["stream"] = {}

    message = load_error(tmp_path, params)

    assert "  stream: the stream needs at least one task" in message


# ---------------------------------------------------------------------------
# The file itself


@pytest.mark.parametrize("text", ["- seed\n- stream\n", "just a string\n", "", "# only a comment\n"])
def test_non_mapping_yaml(tmp_path, text):
    message = error_for_text(tmp_path, text)

    assert message == f"{tmp_path / 'params.yaml'}: expected a mapping of sections at the top level"


def test_invalid_yaml(tmp_path):
    message = error_for_text(tmp_path, "seed: 0\nstream: {digits: [\n")

    assert message.startswith(f"{tmp_path / 'params.yaml'}: not valid YAML:")
    assert "line" in message
    assert "<unicode string>" not in message


def test_duplicate_key_names_file(tmp_path):
    message = error_for_text(tmp_path, "seed: 0\nseed: 1\n")

    assert 'found duplicate key "seed"' in message
    assert f'in "{tmp_path / "params.yaml"}", line 2' in message
    assert "suppress" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "missing.yaml")

    assert str(error.value) == f"{tmp_path / 'missing.yaml'}: not found; run from the repository root or pass --params"


# ---------------------------------------------------------------------------
# The command line


def test_cli_missing_params(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = main(["stage", "init", "--params", str(tmp_path / "missing.yaml")])
    stderr = capsys.readouterr().err

    assert status == 2
    assert stderr == f"drape: error: {tmp_path / 'missing.yaml'}: not found; run from the repository root or pass --params\n"


def test_cli_invalid_params(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, small_params(models={"preset": "huge"}))

    status = main(["stage", "init", "--params", str(tmp_path / "params.yaml")])
    stderr = capsys.readouterr().err

    assert status == 2
    assert stderr.startswith(f"drape: error: {tmp_path / 'params.yaml'}: invalid configuration\n")
    assert "  models.preset: got 'huge'" in stderr
    assert "Traceback" not in stderr
