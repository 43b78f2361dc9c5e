"""Settings for every service, read from FAIRLANE_* environment variables."""

from __future__ import annotations

import secrets
import socket
import uuid
from functools import cached_property

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """One settings object for the suite; each service reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="FAIRLANE_", extra="ignore")

    # Backends.
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/fairlane"
    database_schema: str = Field(
        default="", description="PostgreSQL schema for every table; empty uses the search path."
    )
    database_pool_size: int = 10
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    lane_queue_type: str = Field(
        default="classic",
        description="x-queue-type of lane queues: classic, or quorum on a cluster.",
    )
    lane_quorum_size: int = Field(
        default=3,
        description="Raft members of a quorum lane (x-quorum-initial-group-size); 0: one "
        "on every node (RabbitMQ's default).",
    )

    # Listening addresses and the addresses other services are reached at.
    auth_listen: str = "127.0.0.1:50051"
    queue_listen: str = "127.0.0.1:50052"
    worker_listen: str = "127.0.0.1:50053"
    auth_target: str = "127.0.0.1:50051"
    queue_target: str = "127.0.0.1:50052"
    auth_metrics_port: int = 9101
    queue_metrics_port: int = 9102
    worker_metrics_port: int = 9103
    metrics_host: str = "127.0.0.1"

    # Transport security (docs/security.md).
    tls_cert_file: str = Field(
        default="", description="PEM certificate chain of every gRPC listener (turns TLS on)."
    )
    tls_key_file: str = Field(default="", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field(
        default="",
        description="PEM CA bundle: listeners then require client certificates it signed (mTLS).",
    )
    tls_ca_file: str = Field(
        default="",
        description="PEM CA bundle that verifies the services this process dials (turns TLS "
        "on for its channels; without it, TLS channels use the system roots).",
    )
    tls_client_cert_file: str = Field(
        default="",
        description="PEM certificate this process presents when it dials (mTLS); defaults to "
        "tls_cert_file.",
    )
    tls_client_key_file: str = Field(default="", description="PEM key of tls_client_cert_file.")
    tls_server_name: str = Field(
        default="", description="Name expected in the certificates of dialled services."
    )
    allow_insecure: bool = Field(
        default=False,
        description="Allow plaintext gRPC on non-loopback addresses (logs a warning).",
    )
    reflection: bool = Field(default=False, description="Serve gRPC server reflection.")

    # Identity of this process among replicas (reply routes, worker ids).
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    )

    # Auth.
    service_secret: str = Field(
        default_factory=lambda: secrets.token_urlsafe(32),
        description="Shared by every service: service and operator tokens. `fairlane serve` "
        "refuses to start without one (`fairlane dev` makes its own).",
    )
    access_token_ttl_seconds: int = 900
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    jwt_issuer: str = "fairlane"
    jwt_audience: str = "fairlane"
    # A token with an unknown key refetches at once; this refetch is what drops a retired
    # key (a rotation away from a key that may have leaked), so it is short.
    jwks_refresh_seconds: float = Field(default=30.0, gt=0)
    password_min_length: int = 8
    # Argon2id cost: the OWASP minimum (19 MiB, 2 passes, 1 lane) by default.
    argon2_memory_kib: int = Field(default=19_456, ge=8)
    argon2_time_cost: int = Field(default=2, ge=1)
    argon2_parallelism: int = Field(default=1, ge=1)
    hash_concurrency: int = Field(
        default=2,
        ge=1,
        description="Password hashes computed at once; auth memory is this x argon2_memory_kib.",
    )
    hash_queue_limit: int = Field(
        default=64, ge=0, description="Logins/registrations waiting for a hash before refusals."
    )
    refresh_reuse_interval_seconds: float = Field(
        default=5.0,
        ge=0,
        description="A spent refresh token presented again this soon yields the same new pair.",
    )
    revocation_refresh_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often services refetch revoked token families (the revocation bound).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs of proxies whose x-forwarded-for names the client (throttling).",
    )
    login_user_free_failures: int = Field(
        default=5, ge=1, description="Failed logins per username before delays start."
    )
    login_peer_free_failures: int = Field(
        default=20, ge=1, description="Failed logins per client address before delays start."
    )
    register_peer_free: int = Field(
        default=100, ge=1, description="Registrations per client address before delays start."
    )
    service_token_peer_free_failures: int = Field(
        default=5, ge=1, description="Wrong service secrets per address before delays start."
    )
    throttle_window_seconds: float = Field(
        default=3600.0, gt=0, description="A throttle count starts again after this long quiet."
    )
    throttle_base_delay_seconds: float = Field(default=1.0, gt=0)
    throttle_max_delay_seconds: float = Field(default=900.0, gt=0)
    signing_key_encryption_key: SecretStr | None = Field(
        default=None, description="Encrypts signing keys at rest (signing_keys.private_pem)."
    )
    signing_key_encryption_key_file: str = Field(
        default="", description="File holding the signing-key encryption key (first line)."
    )
    signing_key_previous_encryption_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Former encryption keys: keys under them are re-encrypted at start.",
    )

    # Queue.
    max_payload_bytes: int = 1024 * 1024
    max_output_bytes: int = Field(
        default=4 * 1024 * 1024,
        gt=0,
        # Under gRPC's 8 MiB message limit with room for the rest of a response: a
        # result travels whole in one message (a Session's, WatchResults', GetRequest's).
        le=7 * 1024 * 1024,
        description="Largest handler output; a larger one fails its request (FAILED).",
    )
    default_max_attempts: int = 3
    lane_max_length: int = Field(
        default=10_000,
        description="Unfinished requests a lane may hold; more are refused (counted from the log).",
    )
    write_batch_size: int = 500
    write_linger_ms: float = 2.0
    handler_cache_seconds: float = 2.0
    session_window: int = Field(
        default=1024,
        description="Requests one Session may have unanswered (until their result is sent) "
        "before it stops reading.",
    )
    session_buffer_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="Bytes of result outputs one Session holds for a client that does not "
        "read; past them a result waits without its output, which is read from the log "
        "when its turn to be written comes.",
    )
    max_batch_items: int = Field(
        default=1000, description="Most requests one enqueue_batch message may carry."
    )
    max_streams_per_user: int = Field(
        default=32, description="Open Session and WatchResults streams per user per replica."
    )
    results_page_size: int = Field(
        default=1000, description="Results read from the log per query (WatchResults, Session)."
    )
    result_grace_seconds: float = Field(
        default=5.0,
        description="A Session reads from the log a result this overdue after acceptance.",
    )
    max_deadline_seconds: float = Field(
        default=366 * 24 * 3600.0, description="Farthest a request deadline may lie ahead."
    )
    relay_hold_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How long the relay keeps an idle lane's publish lock; another replica "
        "that needs the lane asks for it and gets it at once (lane-wanted notifications).",
    )
    outbox_stale_seconds: float = Field(
        default=10.0,
        description="Outbox rows this old are published by any replica that can take the lane.",
    )
    stall_seconds: float = Field(
        default=30.0,
        description="A batch stage with work but no progress this long turns health NOT_SERVING.",
    )
    retry_after_ms: int = Field(
        default=1000,
        description="RetryInfo delay of a rejection for our trouble: the request log or the "
        "workers unreachable, shutting down, too many streams.",
    )
    overload_retry_after_ms: int = Field(
        default=500,
        description="RetryInfo delay when FAIRLANE_MAX_PENDING_WRITES requests wait (it clears "
        "as soon as a batch commits, so sooner than FAIRLANE_RETRY_AFTER_MS).",
    )
    user_rate_per_second: float = Field(
        default=5000.0, description="Sustained enqueues per second per user (token bucket)."
    )
    user_burst: int = Field(default=10_000, description="Token bucket size per user.")
    max_pending_writes: int = Field(
        default=20_000,
        description="Requests waiting for their durable write on a replica before UNAVAILABLE "
        "(past it, users holding less than their share are still admitted, up to twice it).",
    )
    lane_idle_ttl_seconds: float = Field(
        default=600.0, description="Delete a lane queue idle and empty for this long."
    )
    retention_days: float = Field(
        default=30.0,
        ge=0,
        description="Finished requests are removed this long after their result; 0 keeps all.",
    )
    maintenance_interval_seconds: float = Field(
        default=3600.0, gt=0, description="How often a queue replica runs log maintenance."
    )
    database_timeout_seconds: float = 10.0
    breaker_threshold: int = 5
    breaker_reset_seconds: float = 2.0

    # Worker.
    concurrency: int = 64
    lane_prefetch: int = 4
    result_batch_size: int = 500
    result_linger_ms: float = 2.0
    retry_base_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    handlers: list[str] = Field(
        default_factory=list, description="Extra handlers as module:attr, besides entry points."
    )
    hooks: list[str] = Field(
        default_factory=list, description="Worker lifecycle hooks as module:attr."
    )
    lane_discovery_seconds: float = Field(
        default=10.0,
        description="How often a worker lists the lanes (ListLanes) besides the lane events.",
    )
    grace_seconds: float = 20.0
    gc_full_collection_every: int = Field(
        default=100,
        ge=1,
        description="Generation 1 collections between two full (generation 2) collections "
        "(Python's default: 10).",
    )
    rebalance_interval_seconds: float = Field(
        default=2.0,
        description="How often a worker compares its busy lanes with its fair share; 0: never.",
    )

    @cached_property
    def reply_route(self) -> str:
        return f"queue.{self.instance_id}"


# Secrets shipped as examples or defaults at some point: never accepted by `fairlane serve`.
PLACEHOLDER_SECRETS = frozenset(
    {"change-me", "changeme", "change-me-please", "compose-insecure-change-me", "secret"}
)
MIN_SECRET_LENGTH = 16


def service_secret_problem(settings: Settings) -> str | None:
    """Why the service secret may not be used to serve, or None when it may."""
    if "service_secret" not in settings.model_fields_set:
        return "FAIRLANE_SERVICE_SECRET is not set: every service needs the same secret"
    secret = settings.service_secret
    if secret.strip().lower() in PLACEHOLDER_SECRETS:
        return "FAIRLANE_SERVICE_SECRET is a placeholder: set a random one"
    if len(secret) < MIN_SECRET_LENGTH:
        return f"FAIRLANE_SERVICE_SECRET is shorter than {MIN_SECRET_LENGTH} characters"
    return None
