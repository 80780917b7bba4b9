//! Every metric name and log event name of the daemon, defined once so names never drift.
//! Metric names are part of the operator interface (ARCHITECTURE.md, "Metrics").

/// Restarts of a supervised actor (label `actor`).
pub const ACTOR_RESTARTS_TOTAL: &str = "actor_restarts_total";
/// Seconds since the daemon started.
pub const UPTIME_SECONDS: &str = "uptime_seconds";
/// Requests served on the admin socket (label `outcome` = ok | error).
pub const ADMIN_REQUESTS_TOTAL: &str = "admin_requests_total";
/// Admin connections open now.
pub const ADMIN_CONNECTIONS: &str = "admin_connections";
/// Admin connections refused (label `reason` = max_connections | peer).
pub const ADMIN_CONNECTIONS_REFUSED_TOTAL: &str = "admin_connections_refused_total";
/// Admin connections closed after `admin.idle_timeout_s` without a request.
pub const ADMIN_CONNECTIONS_IDLE_CLOSED_TOTAL: &str = "admin_connections_idle_closed_total";
/// Failed `accept` calls on the admin socket (e.g. out of descriptors).
pub const ADMIN_ACCEPT_ERRORS_TOTAL: &str = "admin_accept_errors_total";
/// Streams (`generate`) stopped because their client went away.
pub const ADMIN_STREAMS_CANCELLED_TOTAL: &str = "admin_streams_cancelled_total";

/// Log event names (the `event` field of structured log lines).
pub mod events {
    pub const DAEMON_STARTED: &str = "daemon_started";
    pub const DAEMON_READY: &str = "daemon_ready";
    pub const DAEMON_STOPPING: &str = "daemon_stopping";
    pub const DAEMON_STOPPED: &str = "daemon_stopped";
    pub const ACTOR_STARTED: &str = "actor_started";
    pub const ACTOR_RESTARTING: &str = "actor_restarting";
    pub const ACTOR_STOPPED: &str = "actor_stopped";
    pub const ACTOR_CRASH_LOOP: &str = "actor_crash_loop";
    pub const ADMIN_LISTENING: &str = "admin_listening";
    pub const ADMIN_REQUEST_REFUSED: &str = "admin_request_refused";
    pub const ADMIN_PEER_REFUSED: &str = "admin_peer_refused";
    pub const ADMIN_CONNECTION_REFUSED: &str = "admin_connection_refused";
    pub const ADMIN_CONNECTION_IDLE_CLOSED: &str = "admin_connection_idle_closed";
    pub const ADMIN_ACCEPT_FAILED: &str = "admin_accept_failed";
    pub const ADMIN_GENERATE_CANCELLED: &str = "admin_generate_cancelled";
    pub const METRICS_SNAPSHOT: &str = "metrics_snapshot";
    pub const METRICS_HISTORY_FAILED: &str = "metrics_history_failed";
    pub const PROMETHEUS_LISTENING: &str = "prometheus_listening";
    pub const REPLAY_OPENED: &str = "replay_opened";
    pub const REPLAY_RECOVERED: &str = "replay_recovered";
    pub const REPLAY_EVICTED: &str = "replay_evicted";
    pub const INGEST_FILE_DONE: &str = "ingest_file_done";
    pub const INGEST_FILE_FAILED: &str = "ingest_file_failed";
    pub const INGEST_REFUSED_ENTRY: &str = "ingest_refused_entry";
    pub const INGEST_ERROR: &str = "ingest_error";
    pub const INGEST_PAUSED: &str = "ingest_paused";
    pub const INGEST_RESUMED: &str = "ingest_resumed";
    pub const INGEST_HELD_BACK: &str = "ingest_held_back";
    pub const INGEST_HOLD_RELEASED: &str = "ingest_hold_released";
    /// Ingestion stopped: a file cannot be stored (disk full, or another store error).
    pub const INGEST_BLOCKED: &str = "ingest_blocked";
    /// Ingestion runs again after [`INGEST_BLOCKED`].
    pub const INGEST_UNBLOCKED: &str = "ingest_unblocked";
    /// A retry while blocked failed again (rate-limited, with the count held back).
    pub const INGEST_STILL_BLOCKED: &str = "ingest_still_blocked";
    pub const CHECKPOINT_WRITTEN: &str = "checkpoint_written";
    pub const CHECKPOINT_FAILED: &str = "checkpoint_failed";
    pub const CHECKPOINT_REJECTED: &str = "checkpoint_rejected";
    pub const CHECKPOINT_LATEST_REPAIRED: &str = "checkpoint_latest_repaired";
    /// Checkpoint writes started failing (first failure after a success or the start).
    pub const CHECKPOINT_FAILING: &str = "checkpoint_failing";
    /// A checkpoint write succeeded after failures.
    pub const CHECKPOINT_RECOVERED: &str = "checkpoint_recovered";
    /// The final checkpoint at shutdown failed: training since the last one is lost.
    pub const CHECKPOINT_FINAL_FAILED: &str = "checkpoint_final_failed";
    /// Retention deleted checkpoints (or could not).
    pub const CHECKPOINT_RETENTION: &str = "checkpoint_retention";
    /// An operator deleted checkpoints (`ctl checkpoint delete`).
    pub const CHECKPOINT_DELETED: &str = "checkpoint_deleted";
    /// `--accept-checkpoint-model`: a `model.*` field taken from the checkpoint.
    pub const MODEL_FROM_CHECKPOINT: &str = "model_from_checkpoint";
    /// `model.precision = "bf16"` on a CPU without AVX-512 BF16 (the slower portable path).
    pub const PRECISION_WITHOUT_HARDWARE: &str = "precision_without_hardware";
    pub const TOKENIZER_READY: &str = "tokenizer_ready";
    pub const TRAINER_RESUMED: &str = "trainer_resumed";
    pub const TRAINER_STARTED_FRESH: &str = "trainer_started_fresh";
    pub const TRAIN_STEP_FAILED: &str = "train_step_failed";
    pub const EVAL_DONE: &str = "eval_done";
    pub const EXPANSION: &str = "expansion";
    pub const ROLLBACK: &str = "rollback";
    pub const BRANCH_MASKED: &str = "branch_masked";
    /// Every governor decision (`detail`: the decision and its numbers as JSON).
    pub const GOVERNOR_DECISION: &str = "governor_decision";
    /// The coordinator's cluster endpoint is up (`[cluster]`).
    pub const CLUSTER_STARTED: &str = "cluster_started";
    /// A branch host connected for the first time.
    pub const NODE_UP: &str = "node_up";
    /// A branch host's connection closed; its branches are masked.
    pub const NODE_DOWN: &str = "node_down";
    /// A branch host came back and got the coordinator's copy of its branches.
    pub const NODE_REJOINED: &str = "node_rejoined";
    /// A peer whose identity is not in `cluster.nodes` was refused.
    pub const NODE_REFUSED: &str = "node_refused";
    /// A checkpoint was written while some hosts did not give their branches.
    pub const CHECKPOINT_WITHOUT_NODES: &str = "checkpoint_without_nodes";
    /// A step skipped: a layer short of its quorum for `cluster.quorum_wait_ms`.
    pub const STEP_SKIPPED_QUORUM: &str = "step_skipped_quorum";
    /// A generation went on without a node's branches (it failed during the generation).
    pub const GENERATION_NODE_LOST: &str = "generation_node_lost";
}

/// Ingestion (ARCHITECTURE.md "Metrics").
pub const INGEST_ROWS_TOTAL: &str = "ingest_rows_total";
pub const INGEST_ROWS_REJECTED_TOTAL: &str = "ingest_rows_rejected_total";
pub const INGEST_PARSE_ERRORS_TOTAL: &str = "ingest_parse_errors_total";
pub const INGEST_FILES_TOTAL: &str = "ingest_files_total";
pub const INGEST_BYTES_TOTAL: &str = "ingest_bytes_total";
pub const INGEST_ROWS_PER_SEC_WINDOW: &str = "ingest_rows_per_sec_window";
pub const INGEST_EVENTS_PER_SEC_WINDOW: &str = "ingest_events_per_sec_window";
pub const INGEST_PENDING_EVENTS_OBSERVED_PEAK: &str = "ingest_pending_events_observed_peak";
/// 1 while files wait because the replay store is full of rows not trained on yet.
pub const INGEST_HELD_BACK: &str = "ingest_held_back";
/// 1 while ingestion is blocked by a full disk (files wait in the inbox, retried with
/// back-off), 0 otherwise.
pub const INGEST_BLOCKED_DISK_FULL: &str = "ingest_blocked_disk_full";
/// Failed attempts to ingest a file (label `cause` = disk_full | other); the file stays
/// in the inbox.
pub const INGEST_ATTEMPTS_FAILED_TOTAL: &str = "ingest_attempts_failed_total";
/// Replay store.
pub const REPLAY_ROWS: &str = "replay_rows";
pub const REPLAY_BYTES: &str = "replay_bytes";
pub const REPLAY_EVICTED_TOTAL: &str = "replay_evicted_total";

/// Checkpoints.
pub const CHECKPOINTS_TOTAL: &str = "checkpoints_total";
pub const CHECKPOINT_FAILURES_TOTAL: &str = "checkpoint_failures_total";
pub const CHECKPOINTS_REJECTED_TOTAL: &str = "checkpoints_rejected_total";
pub const CHECKPOINT_WRITE_SECONDS: &str = "checkpoint_write_seconds";
pub const CHECKPOINT_BYTES: &str = "checkpoint_bytes";
/// 1 while checkpoint writes fail (disk full or other), 0 once one succeeds.
pub const CHECKPOINT_FAILING: &str = "checkpoint_failing";
/// 1 while the last checkpoint failure was for lack of space.
pub const CHECKPOINT_DISK_FULL: &str = "checkpoint_disk_full";
/// Periodic checkpoints not attempted because writes are failing and backing off.
pub const CHECKPOINTS_SKIPPED_TOTAL: &str = "checkpoints_skipped_total";
/// Checkpoints deleted by retention or by `ctl checkpoint delete`.
pub const CHECKPOINTS_DELETED_TOTAL: &str = "checkpoints_deleted_total";
/// Bytes of all checkpoints kept on disk (after retention).
pub const CHECKPOINTS_DISK_BYTES: &str = "checkpoints_disk_bytes";
pub const ROLLBACKS_TOTAL: &str = "rollbacks_total";

/// Training.
pub const TRAIN_STEPS_TOTAL: &str = "train_steps_total";
/// The trainer's step now (goes back on a rollback; `train_steps_total` never does).
pub const TRAIN_STEP: &str = "train_step";
/// Branches of a layer (label `layer`).
pub const LAYER_WIDTH: &str = "layer_width";
/// Branches of a layer active in the last step's mask (label `layer`).
pub const LAYER_ACTIVE_BRANCHES: &str = "layer_active_branches";
/// Branches under an operator's forced outage (`ctl mask`).
pub const BRANCHES_FORCED_OFF: &str = "branches_forced_off";
pub const TRAIN_TOKENS_PER_SEC: &str = "train_tokens_per_sec";
/// Real (non-padding) input tokens / positions computed, of the last step.
pub const TRAIN_POSITION_UTILIZATION: &str = "train_position_utilization";
/// Histogram: seconds of each training step's compute (forward, backward, clip, update);
/// the snapshot adds `_p50`, `_p90`, `_p99`, `_max` over all steps since the start.
pub const TRAIN_STEP_SECONDS: &str = "train_step_seconds";
pub const LOSS: &str = "loss";
pub const GRAD_NORM: &str = "grad_norm";
pub const ACTIVE_BRANCHES_MEAN: &str = "active_branches_mean";
pub const ACTIVE_BRANCHES_STD: &str = "active_branches_std";
pub const ACTIVE_BRANCHES_MIN: &str = "active_branches_min";
pub const ACTIVE_BRANCHES_MAX: &str = "active_branches_max";
pub const MASK_SPARSITY_MEAN: &str = "mask_sparsity_mean";
pub const MASK_SPARSITY_STD: &str = "mask_sparsity_std";
pub const STEPS_AT_MIN_ACTIVE_SHARE: &str = "steps_at_min_active_share";
pub const GRAD_NORM_RATIO_MEAN: &str = "grad_norm_ratio_scaled_over_unscaled_mean";
pub const GRAD_NORM_RATIO_STD: &str = "grad_norm_ratio_scaled_over_unscaled_std";
pub const COVERAGE_RATIO: &str = "coverage_ratio_used_over_available";
pub const NEW_DATA_RATIO: &str = "new_data_ratio_in_available";
pub const REPLAY_SHARE: &str = "replay_share";
pub const REPLAY_DELTA_LOSS_MEAN: &str = "replay_delta_loss_mean";
pub const REPLAY_DELTA_LOSS_STD: &str = "replay_delta_loss_std";

/// Per layer (label `layer`; `alpha` also `branch`).
pub const PATH_STARVATION_INDEX: &str = "path_starvation_index";
pub const EFFECTIVE_NUM_PATHS: &str = "effective_num_paths";
pub const GINI_CONCENTRATION: &str = "gini_concentration";
pub const TOP1_SHARE: &str = "top1_share";
pub const MARGIN_TOP1_TOP2: &str = "margin_top1_top2";
pub const DIVERSITY_COSINE_DISTANCE_MEAN: &str = "diversity_cosine_distance_mean";
pub const BRANCH_CORRELATION_MEAN: &str = "branch_correlation_mean";
pub const OUTPUT_ENERGY_CV: &str = "output_energy_cv";
pub const ALPHA: &str = "alpha";
pub const BRANCH_SELECT_GINI: &str = "branch_select_gini";
pub const BRANCH_SELECT_TOP1_SHARE: &str = "branch_select_top1_share";

/// Continual learning (control slice).
pub const LOSS_CONTROL_OLD: &str = "loss_control_old";
pub const LOSS_CONTROL_NEW: &str = "loss_control_new";
pub const RETENTION_DELTA_OLD: &str = "retention_delta_old";
pub const RETENTION_DELTA_NEW: &str = "retention_delta_new";
/// Per source (label `source`).
pub const LOSS_CONTROL_SOURCE: &str = "loss_control_source";
/// Control loss with one branch masked (labels `layer`, `branch`).
pub const LOSS_CONTROL_BRANCH_OUT: &str = "loss_control_branch_out";

/// Expansion.
pub const EXPANSION_EVENTS_TOTAL: &str = "expansion_events_total";
pub const ETA_INJECTION_LAST: &str = "eta_injection_last";
pub const SUM_W_NEW_LAST: &str = "sum_w_new_last";
pub const EXPAND_DRIFT_L2_MEAN: &str = "expand_drift_logits_l2_mean";
pub const EXPAND_DRIFT_L2_STD: &str = "expand_drift_logits_l2_std";
pub const EXPAND_DRIFT_COS_MEAN: &str = "expand_drift_logits_cos_dist_mean";
pub const EXPAND_DRIFT_COS_STD: &str = "expand_drift_logits_cos_dist_std";

/// Governor: decisions by kind (label `decision` = none | expand | set_eta | keep | rollback).
pub const GOVERNOR_DECISIONS_TOTAL: &str = "governor_decisions_total";
/// Governor: 1 while an expansion is in ramp or probation, else 0.
pub const GOVERNOR_EXPANSION_IN_PROGRESS: &str = "governor_expansion_in_progress";

/// Cluster (`[cluster]`): 1 while branch host `node` is connected (label `node` = peer id).
pub const NODE_UP: &str = "node_up";
/// Cluster: histogram of the round-trip seconds of host `node`'s answered requests.
pub const NODE_RTT_SECONDS: &str = "node_rtt_seconds";
/// Cluster: passes in which branch (`layer`, `branch`) was masked because its host gave
/// no output in time (late, down, or awaiting its branches).
pub const BRANCH_DEADLINE_MISSES_TOTAL: &str = "branch_deadline_misses_total";
/// Cluster: outputs of remote branches masked for what they held (label `reason` =
/// non_finite: a NaN or infinity; norm: RMS above `cluster.max_output_norm_ratio` × the
/// layer's running median).
pub const BRANCH_OUTPUTS_REJECTED_TOTAL: &str = "branch_outputs_rejected_total";
/// Cluster: steps skipped because a layer stayed short of its quorum.
pub const STEPS_SKIPPED_QUORUM_TOTAL: &str = "steps_skipped_quorum_total";
/// Cluster: payload bytes exchanged with the hosts (label `direction` = in | out).
pub const CLUSTER_BYTES_TOTAL: &str = "cluster_bytes_total";
/// Cluster: connections refused because the peer's identity is not in `cluster.nodes`.
pub const CLUSTER_PEERS_REFUSED_TOTAL: &str = "cluster_peers_refused_total";
/// Cluster: branches masked during a generation because their node failed.
pub const GENERATION_BRANCHES_MASKED_TOTAL: &str = "generation_branches_masked_total";
