import os
from pathlib import Path

import pytest

from leitstand import config
from leitstand.config import Config, ConfigError


def test_token_is_required() -> None:
    for env in ({}, {"LEITSTAND_TOKEN": ""}, {"LEITSTAND_TOKEN": "   "}):
        with pytest.raises(ConfigError, match="LEITSTAND_TOKEN is not set: export"):
            Config.from_env(env)


def test_defaults() -> None:
    cfg = Config.from_env({"LEITSTAND_TOKEN": "t"})
    assert cfg.data_dir == Path("data")
    assert cfg.max_body == 1 << 20
    assert cfg.fsync is True
    assert (cfg.host, cfg.port, cfg.workers) == ("0.0.0.0", 8788, 1)


def test_values_are_parsed() -> None:
    cfg = Config.from_env(
        {
            "LEITSTAND_TOKEN": "t",
            "LEITSTAND_MAX_BODY": "512KiB",
            "LEITSTAND_FSYNC": "never",
            "LEITSTAND_LOG_FORMAT": "JSON",
            "LEITSTAND_WORKERS": "2",
        }
    )
    assert (cfg.max_body, cfg.fsync, cfg.log_format, cfg.workers) == (512 << 10, False, "json", 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEITSTAND_MAX_BODY", "lots"),
        ("LEITSTAND_MAX_BODY", "0"),
        ("LEITSTAND_FSYNC", "sometimes"),
        ("LEITSTAND_PORT", "70000"),
        ("LEITSTAND_WORKERS", "0"),
        ("LEITSTAND_LOG_FORMAT", "xml"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"LEITSTAND_TOKEN": "t", name: value})
    assert str(info.value).startswith(name) and "\n" not in str(info.value)


def test_token_never_in_repr_or_description() -> None:
    cfg = Config.from_env({"LEITSTAND_TOKEN": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(cfg)
    assert "s3cr3t-value" not in str(cfg.describe())


def test_load_probes_and_creates_the_data_dir(tmp_path: Path) -> None:
    target = tmp_path / "new" / "data"
    cfg = config.load({"LEITSTAND_TOKEN": "t", "LEITSTAND_DATA_DIR": str(target)})
    assert cfg.data_dir == target and target.is_dir()
    assert os.listdir(target) == []  # the probe file is gone


def test_load_names_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="LEITSTAND_DATA_DIR is not usable: not a directory"):
        config.load({"LEITSTAND_TOKEN": "t", "LEITSTAND_DATA_DIR": str(tmp_path / "file")})


def test_every_setting_is_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for setting in config.SETTINGS:
        assert f"`{setting.env}`" in readme, setting.env
