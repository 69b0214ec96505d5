"""Unit tests of settings, their validation, and store URL resolution."""

from __future__ import annotations

import pytest

from makeway.errors import ConfigError, UsageError
from makeway.policy import (
    CONFIG_ENV,
    DEFAULT_TIERS,
    Settings,
    load_settings,
    settings_from_mapping,
    validate_priority,
    validate_tier_name,
)
from makeway.store import DEFAULT_STORE_URL, STORE_ENV, resolve_store_url, sqlite_path


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Run in an empty directory with no MAKEWAY_CONFIG or MAKEWAY_STORE set."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- defaults -------------------------------------------------------------


def test_defaults_four_tiers():
    assert set(Settings().tiers) == {"interactive", "essential", "opportunistic", "bulk"}


def test_defaults_tier_order():
    tiers = Settings().tiers
    by_rank = sorted(tiers, key=lambda name: tiers[name].rank)

    assert by_rank == ["interactive", "essential", "opportunistic", "bulk"]


def test_defaults_interactive_not_preemptible():
    interactive = Settings().tier("interactive")

    assert interactive.pool == "interactive"
    assert interactive.preemptible is False
    assert interactive.min_share == 0.0


def test_defaults_background_tiers_preemptible():
    tiers = Settings().tiers

    for name in ("essential", "opportunistic", "bulk"):
        assert tiers[name].pool == "background", name
        assert tiers[name].preemptible is True, name


def test_defaults_job_settings():
    settings = Settings()

    assert settings.jobs.default_tier == "bulk"
    assert settings.store is None
    assert settings.policy.scheduling == "tiers"


def test_unknown_tier_lookup_raises():
    with pytest.raises(UsageError, match="nightly"):
        Settings().tier("nightly")


def test_load_settings_without_file(clean_env):
    settings, path = load_settings()

    assert path is None
    assert settings == Settings()


# -- settings_from_mapping ------------------------------------------------


def test_user_tier_merged_over_default():
    settings = settings_from_mapping({"tiers": {"bulk": {"max_wait_s": 100.0}}})
    bulk = settings.tier("bulk")

    assert bulk.max_wait_s == 100.0
    assert bulk.rank == DEFAULT_TIERS["bulk"].rank
    assert bulk.min_share == DEFAULT_TIERS["bulk"].min_share
    assert set(settings.tiers) == set(DEFAULT_TIERS)


def test_new_tier_with_rank_added():
    settings = settings_from_mapping({"tiers": {"nightly": {"rank": 40, "aging_per_s": 0.0}}})

    assert settings.tier("nightly").rank == 40
    assert settings.tier("nightly").aging_per_s == 0.0
    assert settings.tier("nightly").pool == "background"
    assert "bulk" in settings.tiers


def test_new_tier_without_rank_rejected():
    with pytest.raises(ConfigError, match=r"tiers\.nightly.*needs a rank"):
        settings_from_mapping({"tiers": {"nightly": {"max_wait_s": 10.0}}})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"colour": "blue"}, "colour"),
        ({"node": {"slot": 4}}, "node.slot"),
        ({"tiers": {"bulk": {"weight": 2}}}, "tiers.bulk.weight"),
        ({"policy": {"mode": "all"}}, "policy.mode"),
    ],
)
def test_unknown_key_rejected(raw, key):
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw)

    assert key in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "key", "value"),
    [
        ({"tiers": {"essential": {"max_wait_s": -1.0}}}, "tiers.essential.max_wait_s", "-1.0"),
        ({"tiers": {"bulk": {"min_share": 1.5}}}, "tiers.bulk.min_share", "1.5"),
        ({"node": {"lease_s": 10.0, "heartbeat_s": 6.0}}, "node.heartbeat_s", "6.0"),
        ({"node": {"slots": 0}}, "node.slots", "0"),
        ({"policy": {"suspend": "sometimes"}}, "policy.suspend", "'sometimes'"),
        ({"jobs": {"max_retries": -1}}, "jobs.max_retries", "-1"),
        ({"policy": {"node_nice": True}}, "policy.node_nice", "True"),
    ],
)
def test_bad_value_names_key_and_value(raw, key, value):
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw)

    assert f"{key} = {value}" in str(caught.value)


def test_bad_value_names_source():
    with pytest.raises(ConfigError, match="site.toml"):
        settings_from_mapping({"node": {"slots": 0}}, source="site.toml")


def test_heartbeat_half_lease_accepted():
    settings = settings_from_mapping({"node": {"lease_s": 10.0, "heartbeat_s": 5.0}})

    assert settings.node.heartbeat_s == 5.0


def test_short_lease_default_heartbeat_rejected():
    with pytest.raises(ConfigError, match="heartbeat_s"):
        settings_from_mapping({"node": {"lease_s": 5.0}})


def test_bad_tier_name_rejected():
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"tiers": {"Bulk Jobs": {"rank": 40}}})

    assert "'Bulk Jobs'" in str(caught.value)
    assert "tier name" in str(caught.value)


def test_tiers_not_a_table_rejected():
    with pytest.raises(ConfigError, match=r"\[tiers\]"):
        settings_from_mapping({"tiers": ["bulk"]})


def test_default_tier_must_exist():
    with pytest.raises(ConfigError, match="jobs.default_tier = 'nightly'"):
        settings_from_mapping({"jobs": {"default_tier": "nightly"}})


def test_interactive_pool_required():
    with pytest.raises(ConfigError, match="interactive pool"):
        settings_from_mapping({"tiers": {"interactive": {"pool": "background"}}})


def test_validate_tier_name_accepts_valid():
    assert validate_tier_name("night-bulk_2") == "night-bulk_2"


@pytest.mark.parametrize("priority", [True, 1.5, 10**9, -(10**9), "1"])
def test_validate_priority_rejects(priority):
    with pytest.raises(UsageError):
        validate_priority(priority)


# -- load_settings --------------------------------------------------------


def test_load_settings_from_file(clean_env):
    path = clean_env / "makeway.toml"
    path.write_text('store = "sqlite:///jobs.db"\n[tiers.nightly]\nrank = 40\n', encoding="utf-8")

    settings, found = load_settings()

    assert found == path
    assert settings.store == "sqlite:///jobs.db"
    assert settings.tier("nightly").rank == 40


def test_load_settings_malformed_toml(clean_env):
    path = clean_env / "broken.toml"
    path.write_text("[node\nslots = 2\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)
    assert "TOML" in str(caught.value)


def test_load_settings_bad_value_names_file(clean_env):
    path = clean_env / "makeway.toml"
    path.write_text("[node]\nslots = 0\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)
    assert "node.slots = 0" in str(caught.value)


def test_load_settings_explicit_missing(clean_env):
    missing = clean_env / "missing.toml"

    with pytest.raises(ConfigError, match="missing.toml"):
        load_settings(missing)


def test_config_env_missing_file(clean_env, monkeypatch):
    missing = clean_env / "nowhere.toml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert CONFIG_ENV in str(caught.value)
    assert str(missing) in str(caught.value)


def test_config_env_used(clean_env, monkeypatch):
    path = clean_env / "elsewhere.toml"
    path.write_text("[node]\nslots = 3\n", encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV, str(path))

    settings, found = load_settings()

    assert found == path
    assert settings.node.slots == 3


# -- store URLs -----------------------------------------------------------


def test_store_url_explicit_wins(clean_env, monkeypatch):
    monkeypatch.setenv(STORE_ENV, "sqlite:///from-env.db")

    assert resolve_store_url("sqlite:///explicit.db", "sqlite:///from-config.db") == "sqlite:///explicit.db"


def test_store_url_env_over_config(clean_env, monkeypatch):
    monkeypatch.setenv(STORE_ENV, "sqlite:///from-env.db")

    assert resolve_store_url(None, "sqlite:///from-config.db") == "sqlite:///from-env.db"


def test_store_url_config_over_default(clean_env):
    assert resolve_store_url(None, "sqlite:///from-config.db") == "sqlite:///from-config.db"


def test_store_url_default(clean_env):
    assert resolve_store_url(None, None) == DEFAULT_STORE_URL
    assert DEFAULT_STORE_URL == "sqlite:///makeway.db"


def test_store_url_empty_env_ignored(clean_env, monkeypatch):
    monkeypatch.setenv(STORE_ENV, "")

    assert resolve_store_url(None, None) == DEFAULT_STORE_URL


def test_sqlite_path_relative(clean_env):
    assert sqlite_path("sqlite:///data/jobs.db") == (clean_env / "data" / "jobs.db").resolve()


def test_sqlite_path_absolute(clean_env, monkeypatch):
    absolute = (clean_env / "absolute" / "jobs.db").resolve()
    monkeypatch.chdir("/")

    assert sqlite_path("sqlite:///" + str(absolute)) == absolute
    assert sqlite_path("sqlite:///" + str(absolute)).is_absolute()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://jobs.db", "postgresql://user@host/db", "jobs.db"])
def test_sqlite_path_bad_url(url):
    with pytest.raises(UsageError, match="is invalid"):
        sqlite_path(url)
