import re
from pathlib import Path

import pytest

from cooldown.config import (
    DEFAULT_HOSTS,
    Config,
    ConfigError,
    Pace,
    load_config,
    parse_config,
    parse_duration,
    resolve_config_path,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.yaml.example"


def test_defaults_are_the_seeds():
    limits = Config().cerebras_limits
    assert (limits.rpm_limit, limits.tpm_limit, limits.max_queue_depth) == (1000, 1_000_000, 100)
    assert limits.request_timeout == 600.0
    assert limits.priority_threshold == 0.7
    assert Config().cerebras_hosts == DEFAULT_HOSTS
    assert Config().circuit_breaker.failure_threshold == 10
    assert Config().circuit_breaker.open_duration == 60.0


def test_empty_document_means_defaults():
    assert parse_config(None).cerebras_limits == Config().cerebras_limits


def test_seed_example_file_loads():
    config = load_config(EXAMPLE)
    assert config.cerebras_limits.rpm_limit == 1000
    assert config.cerebras_limits.request_timeout == 600.0
    assert config.rate_limits[0].domain == "*.openai.com"
    assert config.rate_limits[0].requests_per_second == 50
    assert config.default_rate_limit == Pace(requests_per_second=10)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600),
        ("30s", 30),
        ("1h", 3600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (45, 45),
        ("2.5", 2.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10 minutes", "-5", 0, "m", True, None, "1x", "nan"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("document", "expected_fragments"),
    [
        (
            {"cerebras_limits": {"rpm_limit": -5}},
            ["cerebras_limits.rpm_limit", "-5", "positive integer"],
        ),
        ({"cerebras_limits": {"rpm_limit": True}}, ["cerebras_limits.rpm_limit", "True"]),
        ({"cerebras_limits": {"tpm_limit": "lots"}}, ["cerebras_limits.tpm_limit", "'lots'"]),
        ({"cerebras_limits": {"priority_threshold": 1.5}}, ["priority_threshold", "1.5", "0 to 1"]),
        (
            {"cerebras_limits": {"request_timeout": "soon"}},
            ["request_timeout", "'soon'", "duration"],
        ),
        (
            {"cerebras_limits": {"tpm_limt": 5}},
            ["cerebras_limits.tpm_limt", "unknown key", "tpm_limit"],
        ),
        ({"cerebras_limit": {}}, ["cerebras_limit", "unknown key"]),
        ({"cerebras_limits": [1, 2]}, ["cerebras_limits", "mapping"]),
        ({"cerebras_hosts": []}, ["cerebras_hosts", "non-empty list"]),
        ({"cerebras_hosts": ["bad host!"]}, ["cerebras_hosts[0]", "bad host!"]),
        ({"cerebras_upstream": "ftp://x"}, ["cerebras_upstream", "ftp://x"]),
        ({"cerebras_upstream": "http://127.0.0.1:8/v1"}, ["cerebras_upstream", "no path"]),
        ({"cerebras_upstream": "http://127.0.0.1:99999"}, ["cerebras_upstream", "valid port"]),
        ({"rate_limits": [{"domain": "x.com"}]}, ["rate_limits[0]", "missing requests_per_second"]),
        (
            {"rate_limits": [{"domain": "x.com", "requests_per_second": 0}]},
            ["requests_per_second", "0"],
        ),
        ({"default_rate_limit": {"rps": 3}}, ["default_rate_limit.rps", "unknown key"]),
        ({"default_rate_limit": {"burst": 3}}, ["default_rate_limit", "missing requests_per"]),
        (
            {"rate_limits": [{"domain": "a*.x.com", "requests_per_second": 1}]},
            ["rate_limits[0].domain", "*. and a domain"],
        ),
        (
            {"rate_limits": [{"domain": "x.com", "requests_per_second": 1, "burst": 0}]},
            ["rate_limits[0].burst", "positive integer"],
        ),
        ({"circuit_breaker": {"failure_threshold": 0}}, ["circuit_breaker.failure_threshold", "0"]),
        ([1, 2], ["(top level)", "mapping"]),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(document, expected_fragments):
    with pytest.raises(ConfigError) as err:
        parse_config(document)
    message = str(err.value)
    assert "\n" not in message
    for fragment in expected_fragments:
        assert fragment in message


def test_new_keys_sit_beside_the_seeds(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "cerebras_limits:\n  rpm_limit: 30\n  tpm_limit: 60000\n  request_timeout: 90s\n"
        "  context_length: 65536\n  priority_aging: 1m\n"
        "circuit_breaker:\n  failure_threshold: 3\n  open_duration: 5s\n"
        "cerebras_hosts: [api.cerebras.ai, '*.example.test']\n"
        "cerebras_upstream: http://127.0.0.1:8765/\n"
        "server:\n  port: 8080\n"
    )
    config = load_config(path)
    assert config.cerebras_limits.rpm_limit == 30
    assert config.cerebras_limits.request_timeout == 90
    assert config.cerebras_limits.context_length == 65536
    assert config.cerebras_limits.priority_aging == 60
    assert config.circuit_breaker.open_duration == 5
    assert config.cerebras_hosts == ("api.cerebras.ai", "*.example.test")
    assert config.cerebras_upstream == "http://127.0.0.1:8765"
    assert config.source == str(path)


def test_invalid_yaml_points_at_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cerebras_limits:\n  rpm_limit: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cerebras_limits:\n  rpm_limit: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: cerebras_limits\.rpm_limit: got 0"):
        load_config(path)


def test_config_path_resolution(tmp_path):
    assert resolve_config_path("/x/y.yaml", cwd=tmp_path) == Path("/x/y.yaml")
    assert resolve_config_path(None, cwd=tmp_path) is None
    (tmp_path / "config.yaml").write_text("{}")
    assert resolve_config_path(None, cwd=tmp_path) == tmp_path / "config.yaml"


def test_models_section_and_fallback_to_cerebras_limits():
    config = parse_config(
        {
            "cerebras_limits": {"rpm_limit": 30, "rph_limit": 900, "output_reservation": 4096},
            "models": {
                "llama3.1-8b": {"tpm_limit": 60000, "tpd_limit": 1000000, "context_length": 8192}
            },
        }
    )
    own = config.model_limits("llama3.1-8b")
    assert (own.rpm_limit, own.rph_limit, own.tpm_limit, own.tpd_limit) == (30, 900, 60000, 1000000)
    assert (own.context_length, own.output_reservation) == (8192, 4096)
    other = config.model_limits("qwen-3-32b")
    assert (other.tpm_limit, other.tpd_limit, other.context_length) == (1_000_000, None, 131072)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"models": {"m": {"tpm_limt": 5}}}, "models.m.tpm_limt: unknown key"),
        ({"models": {"m": {"rpd_limit": -1}}}, "models.m.rpd_limit: got -1"),
        ({"models": ["m"]}, "models: got ['m']"),
        ({"cerebras_limits": {"max_retries": -1}}, "cerebras_limits.max_retries: got -1"),
        ({"metrics_listen": "9464"}, "metrics_listen: got '9464'; expected host:port"),
        ({"metrics_listen": "127.0.0.1:70000"}, "metrics_listen: got '127.0.0.1:70000'"),
        (
            {"cerebras_limits": {"algorithm": "leaky"}},
            "cerebras_limits.algorithm: got 'leaky'; expected token_bucket or sliding_window",
        ),
        ({"models": {"m": {"algorithm": 1}}}, "models.m.algorithm: got 1; expected token_bucket"),
        ({"cerebras_limits": {"probe_first": "yes"}}, "probe_first: got 'yes'; expected true or"),
        ({"cerebras_limits": {"probe_timeout": 0}}, "cerebras_limits.probe_timeout: got 0"),
    ],
)
def test_bad_new_keys(document, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_config(document)


def test_algorithm_defaults_to_the_bucket_and_is_chosen_per_model():
    config = parse_config(
        {
            "cerebras_limits": {"probe_first": False, "probe_timeout": "500ms"},
            "models": {"windowed": {"algorithm": "sliding_window"}},
        }
    )
    assert config.cerebras_limits.algorithm == "token_bucket"
    limits = config.cerebras_limits
    assert (limits.probe_first, limits.probe_timeout) == (False, 0.5)
    assert config.model_limits("windowed").algorithm == "sliding_window"
    assert config.model_limits("other").algorithm == "token_bucket"


def test_metrics_listen():
    assert parse_config({"metrics_listen": "127.0.0.1:9464"}).metrics_listen == ("127.0.0.1", 9464)
    assert parse_config({"metrics_listen": "[::1]:9464"}).metrics_listen == ("::1", 9464)
    assert parse_config({}).metrics_listen is None
