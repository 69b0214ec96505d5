"""Tiers, policy settings and their defaults, loaded from `makeway.toml`.

Every tunable value has its default here, in one place; docs/configuration.md
lists the same table for users. Validation is strict: an unknown key or an
out-of-range value is a ConfigError naming the key, the value and the fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from makeway.errors import ConfigError, UsageError

CONFIG_FILE_NAME = "makeway.toml"
CONFIG_ENV = "MAKEWAY_CONFIG"
TIER_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PRIORITY_MIN = -1_000_000
PRIORITY_MAX = 1_000_000

INTERACTIVE_POOL = "interactive"
BACKGROUND_POOL = "background"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PreemptionMode = Literal["suspend", "yield", "requeue"]


class TierConfig(_Strict):
    """Rules of one tier. A lower rank runs first and may preempt higher ranks."""

    rank: int = Field(ge=0, le=1000)
    pool: Literal["interactive", "background"] = BACKGROUND_POOL
    preemptible: bool = True
    # A job that has waited this long is dispatched before every job of its pool
    # that has not, whatever the ranks and priorities.
    max_wait_s: float = Field(default=3600.0, gt=0)
    # Priority points a queued job gains per second of waiting (aging).
    aging_per_s: float = Field(default=0.1, ge=0)
    # Fraction of every min_share_period_s that the tier runs even while higher
    # tiers keep it suspended, so that no tier starves.
    min_share: float = Field(default=0.05, ge=0, lt=1)
    # Preemption modes usable against this tier, in the order they are tried.
    # Interactive work suspends the tier's jobs if "suspend" is listed. Handing
    # a slot to another background job (time slicing, a higher tier, a pause)
    # tries the modes in order: "suspend" parks the job in its worker while
    # node.max_parked_jobs allows, "yield" requests a yield, and a job that
    # has not yielded after yield_grace_s gets the next mode.
    preemption: tuple[PreemptionMode, ...] = ("suspend", "yield", "requeue")
    # A running job of this tier keeps its slot at least this long when jobs of
    # the same or a higher tier wait, unless one of them is past its max_wait_s.
    quantum_s: float = Field(default=30.0, gt=0)
    yield_grace_s: float = Field(default=5.0, ge=0)
    # For "requeue": time between asking the job to yield and SIGTERM.
    requeue_grace_s: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _known_modes_once(self) -> TierConfig:
        if len(set(self.preemption)) != len(self.preemption):
            raise ValueError(f"preemption = {list(self.preemption)} lists a mode twice; list each mode once")
        return self


DEFAULT_TIERS: dict[str, TierConfig] = {
    "interactive": TierConfig(rank=0, pool=INTERACTIVE_POOL, preemptible=False, max_wait_s=1.0, min_share=0.0),
    "essential": TierConfig(rank=10, max_wait_s=60.0),
    "opportunistic": TierConfig(rank=20, max_wait_s=600.0),
    "bulk": TierConfig(rank=30, max_wait_s=3600.0),
}


class NodeConfig(_Strict):
    """Process layout and timing of a node."""

    # None means one per CPU core of the machine.
    slots: int | None = Field(default=None, ge=1, le=4096)
    interactive_workers: int | None = Field(default=None, ge=0, le=4096)
    background_workers: int | None = Field(default=None, ge=0, le=4096)
    poll_interval_s: float = Field(default=0.5, gt=0, le=60)
    lease_s: float = Field(default=30.0, gt=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Background jobs that time slicing may hold suspended, each in a worker of
    # its own, so that jobs without checkpoints can take turns without losing
    # work. None means as many as background_workers.
    max_parked_jobs: int | None = Field(default=None, ge=0, le=4096)
    # Whether the supervisor records its counters and histograms. Off, every
    # observation is a call that does nothing; store-wide figures stay.
    metrics: bool = True

    @model_validator(mode="after")
    def _heartbeat_below_lease(self) -> NodeConfig:
        if self.heartbeat_s > self.lease_s / 2:
            raise ValueError(
                f"node.heartbeat_s = {self.heartbeat_s} must be at most half of node.lease_s = {self.lease_s}, "
                "so one late heartbeat does not expire a lease; lower heartbeat_s or raise lease_s"
            )
        return self

    def resolved_slots(self) -> int:
        return self.slots or os.cpu_count() or 1

    def resolved_interactive_workers(self) -> int:
        return self.resolved_slots() if self.interactive_workers is None else self.interactive_workers

    def resolved_background_workers(self) -> int:
        return self.resolved_slots() if self.background_workers is None else self.background_workers

    def resolved_max_parked_jobs(self) -> int:
        return self.resolved_background_workers() if self.max_parked_jobs is None else self.max_parked_jobs


class PolicyConfig(_Strict):
    """Preemption and OS-priority rules the supervisor applies to lower tiers."""

    # "tiers": per-tier pools with preemption. "fifo": one pool, first in first
    # out, no preemption, no OS priority; the plain baseline the demo compares with.
    scheduling: Literal["tiers", "fifo"] = "tiers"
    # "all" stops every lower-tier worker while interactive work runs or waits.
    # "as-needed" stops only as many as free the slots interactive work needs.
    # "off" leaves preemption to OS priority alone.
    suspend: Literal["all", "as-needed", "off"] = "all"
    # How long interactive work must have drained before suspended workers resume.
    suspend_hold_s: float = Field(default=0.001, ge=0, le=60)
    min_share_period_s: float = Field(default=1.0, gt=0, le=3600)
    # CPU nice value of the supervisor and the interactive workers, or
    # "inherit" to keep the value the node started with. Below 0 the node
    # reacts to a submission before other normal processes under load. That
    # needs CAP_SYS_NICE or RLIMIT_NICE. Without either, the node keeps its
    # value and logs a warning. Not applied with scheduling = "fifo".
    node_nice: int | Literal["inherit"] = -5
    background_nice: int = Field(default=19, ge=0, le=19)
    background_ionice: Literal["idle", "best-effort", "none"] = "idle"
    # "idle" runs background workers under SCHED_IDLE instead of the normal
    # scheduler, so any waking normal process preempts them at once. It took
    # the loaded interactive p99 from 1.24x to 1.00x of idle without
    # suspension in benchmarks/interactive_latency.py on 2 cores.
    background_cpu_policy: Literal["normal", "idle"] = "idle"

    @field_validator("node_nice", mode="before")
    @classmethod
    def _nice_or_inherit(cls, value: Any) -> Any:
        if value == "inherit" or (type(value) is int and -20 <= value <= 19):
            return value
        raise ValueError("use an integer from -20 to 19, or 'inherit' to keep the nice value the node started with")


class JobDefaults(_Strict):
    """Defaults for jobs that their registration or submission does not set."""

    default_tier: str = "bulk"
    max_retries: int = Field(default=3, ge=0, le=1000)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_backoff_max_s: float = Field(default=300.0, ge=0)
    # Width of the random spread added to the first retry's delay; it doubles
    # per failure like the delay. Seconds, not a fraction, so that jobs that
    # failed together do not retry together (see makeway.scheduler.retry).
    retry_jitter_s: float = Field(default=30.0, ge=0)
    # A lost worker (killed, crashed, out of memory) requeues its job without
    # using a retry; past this many lost workers the job fails instead.
    max_worker_losses: int = Field(default=3, ge=0, le=1000)
    payload_limit_bytes: int = Field(default=1_048_576, ge=1)
    # Maximum time a ctx.transaction() block may keep the store's write lock.
    # A longer block is rolled back with an error. It blocks every other writer,
    # the supervisor included, so it stays well below node.lease_s.
    transaction_max_s: float = Field(default=2.0, gt=0, le=60)
    # How long after its job ended an idempotency key still returns that job.
    idempotency_ttl_s: float = Field(default=86_400.0, gt=0)
    # Ended jobs, with their results, events and errors, are deleted this long
    # after they ended, so the store does not grow without bound.
    retention_s: float = Field(default=7 * 86_400.0, gt=0)
    # Cancelling a running job (by a user, a time limit or a deadline) sets its
    # cancellation flag, sends SIGTERM to its process group cancel_grace_s
    # later, and SIGKILL kill_grace_s after that.
    cancel_grace_s: float = Field(default=0.5, ge=0, le=3600)
    kill_grace_s: float = Field(default=3.0, ge=0, le=3600)


class HttpConfig(_Strict):
    """The HTTP endpoint of a node (`makeway node --http`) and of `makeway dashboard`."""

    # host:port to listen on. Empty means no endpoint unless --http names one.
    listen: str = ""
    # Bearer token for requests that change state. Empty means: generate one
    # at start on a loopback address, and refuse to start on any other.
    token: str = ""


class Settings(_Strict):
    """The whole of `makeway.toml`."""

    store: str | None = None
    node: NodeConfig = NodeConfig()
    http: HttpConfig = HttpConfig()
    policy: PolicyConfig = PolicyConfig()
    jobs: JobDefaults = JobDefaults()
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: dict(DEFAULT_TIERS))

    def tier(self, name: str) -> TierConfig:
        """Return the tier called `name`, or raise UsageError listing the known tiers."""
        try:
            return self.tiers[name]
        except KeyError:
            raise UsageError(
                f"tier {name!r} is unknown; use one of {sorted(self.tiers)} or define it under [tiers.{name}] in makeway.toml"
            ) from None


def validate_tier_name(name: object) -> str:
    if not isinstance(name, str) or not TIER_NAME_PATTERN.match(name):
        raise ConfigError(
            f"tier name {name!r} is invalid; use 1 to 32 lowercase letters, digits, '-' or '_', starting with a letter"
        )
    return name


def validate_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise UsageError(f"priority {priority!r} is invalid; pass an integer (higher runs first)")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise UsageError(f"priority {priority} is out of range; use an integer from {PRIORITY_MIN} to {PRIORITY_MAX}")
    return priority


def _merge_tiers(raw_tiers: Any, source: str) -> dict[str, Any]:
    """Overlay the [tiers.*] tables on the default tiers, key by key."""
    if not isinstance(raw_tiers, dict):
        raise ConfigError(f"{source}: [tiers] must be a table of tier tables, got {raw_tiers!r}")
    merged: dict[str, Any] = {name: tier.model_dump() for name, tier in DEFAULT_TIERS.items()}
    for name, table in raw_tiers.items():
        try:
            validate_tier_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [tiers.{name}] must be a table, got {table!r}")
        if name not in merged and "rank" not in table:
            raise ConfigError(f"{source}: [tiers.{name}] is a new tier and needs a rank (0 runs first; bulk has 30)")
        merged[name] = {**merged.get(name, {}), **table}
    return merged


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        value = error.get("input")
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key} = {value!r}: unknown key; docs/configuration.md lists the valid keys of each table")
        else:
            lines.append(f"  {key} = {value!r}: {error['msg']}")
    lines.append("Fix these keys; docs/configuration.md lists every key with its default.")
    return "\n".join(lines)


def settings_from_mapping(raw: dict[str, Any], source: str = "settings") -> Settings:
    """Validate a parsed config mapping into Settings, raising ConfigError."""
    raw = dict(raw)
    if "tiers" in raw:
        raw["tiers"] = _merge_tiers(raw["tiers"], source)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None

    if settings.jobs.default_tier not in settings.tiers:
        raise ConfigError(
            f"{source}: jobs.default_tier = {settings.jobs.default_tier!r} is not a tier; "
            f"use one of {sorted(settings.tiers)}"
        )
    if not any(tier.pool == INTERACTIVE_POOL for tier in settings.tiers.values()):
        raise ConfigError(f"{source}: no tier uses the interactive pool; keep the 'interactive' tier or set pool = 'interactive' on one")
    return settings


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the config file to read: `explicit`, then $MAKEWAY_CONFIG, then ./makeway.toml."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing path or leave it out")
        return path
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={from_env!r} names no file; fix or unset it")
        return path
    path = Path.cwd() / CONFIG_FILE_NAME
    return path if path.is_file() else None


def load_settings(config_path: str | os.PathLike[str] | None = None) -> tuple[Settings, Path | None]:
    """Load and validate settings; return them with the file they came from (or None)."""
    path = find_config_file(config_path)
    if path is None:
        return Settings(), None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}. Fix the syntax at that line.") from None
    return settings_from_mapping(raw, source=str(path)), path
