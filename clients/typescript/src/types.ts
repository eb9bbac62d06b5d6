/**
 * The client's view of the contract: enums as string unions ("READY", not 2), int64 sizes as `bigint`,
 * timestamps as `Date`, durations as milliseconds. The generated wire types stay available as `wire`.
 *
 * "UNSPECIFIED" stands for a value the service left unset, or one this client does not know yet (sent by
 * a newer service).
 */

/** Where a backup is in its life cycle. */
export type BackupState = "CREATING" | "READY" | "FAILED" | "UNSPECIFIED";
/** pg_dump's output format: plain SQL (psql) or custom (`.dump`, pg_restore). */
export type BackupFormat = "PLAIN" | "CUSTOM" | "UNSPECIFIED";
/** Compression of the archive file as a whole; a custom-format archive is NONE (compressed inside). */
export type Compression = "NONE" | "GZIP" | "ZSTD" | "UNSPECIFIED";
/** What started a backup. */
/** Where a copy of an archive is kept: the service's backup directory, or the S3-compatible bucket. */
export type StorageLocation = "LOCAL" | "BUCKET" | "UNSPECIFIED";
export type BackupTrigger = "MANUAL" | "SCHEDULED" | "PRE_RESTORE" | "UPLOADED" | "EXTERNAL" | "UNSPECIFIED";
/** A step of a long operation. */
export type Phase =
  | "PREPARING"
  | "DUMPING"
  | "FINALIZING"
  | "UPLOADING"
  | "VERIFYING"
  | "SAFETY_BACKUP"
  | "RESTORING"
  | "DONE"
  | "CHECKING"
  | "UNSPECIFIED";
/** The kind of a job: running now (BACKUP, RESTORE, VERIFY), or in the job history (also DELETE, RETENTION). */
export type JobKind = "BACKUP" | "RESTORE" | "VERIFY" | "DELETE" | "RETENTION" | "UNSPECIFIED";
/** The outcome of a backup's last verification; "UNSPECIFIED" when it never was verified. */
export type VerifyResult = "PASSED" | "FAILED" | "UNSPECIFIED";
/** How a job in the history ended. */
export type JobOutcome = "SUCCEEDED" | "FAILED" | "CANCELLED" | "INTERRUPTED" | "UNSPECIFIED";

/** One archive in the service's backup directory. */
export interface Backup {
  /** The archive's file name, e.g. `aperture-backup-2026-11-28T01-00-00-123456Z-7f3a.sql.gz`. */
  id: string;
  /** What a download should be saved as (equal to `id` today). */
  filename: string;
  state: BackupState;
  /** When the backup started (for a file found in the directory: its modification time). */
  createTime: Date | undefined;
  /** Size of the archive in bytes (written so far while CREATING). */
  sizeBytes: bigint;
  /** SHA-256 of the archive, lowercase hex; "" while CREATING or when FAILED. */
  sha256: string;
  format: BackupFormat;
  compression: Compression;
  trigger: BackupTrigger;
  /** Name of the database that was dumped; "" when unknown. */
  database: string;
  /** PostgreSQL server version that was dumped, e.g. "16.14"; "" when unknown. */
  serverVersion: string;
  /** Version of the pg_dump that wrote the archive; "" when unknown. */
  pgDumpVersion: string;
  /** How long the backup took, in milliseconds; undefined while CREATING or when unknown. */
  durationMs: number | undefined;
  /** Why the backup failed, when FAILED; "" otherwise. */
  error: string;
  /** Whether the archive is encrypted with age (its id then ends in `.age`). */
  encrypted: boolean;
  /** The age public keys an encrypted archive was encrypted to, when known. */
  ageRecipients: string[];
  /**
   * Where copies are (directory first); empty for a backup without an archive. A READY backup without
   * "BUCKET" while a bucket is configured waits for its offsite copy.
   */
  locations: StorageLocation[];
  /** When the backup was last verified (restored into a scratch database and checked); undefined if never. */
  verifyTime: Date | undefined;
  verifyResult: VerifyResult;
  /**
   * The check that failed when `verifyResult` is "FAILED": "restore", "tables", "row_counts", "indexes",
   * "extensions" or "verify_sql"; "" otherwise.
   */
  verifyFailedCheck: string;
  /** What the verification found, for a person. */
  verifyMessage: string;
  /** Whether retention must keep the backup now (see `pin`). */
  pinned: boolean;
  /** When the pin expires; undefined for a pin without expiry, or when not pinned. */
  pinExpireTime: Date | undefined;
  /** Rows by table ("public.users") counted as the dump streamed through; {} when not known. */
  tableRows: Record<string, bigint>;
}

/** Progress of a long operation (create, restore, upload). */
export interface Progress {
  phase: Phase;
  /** Bytes processed in this step so far. */
  bytesDone: bigint;
  /** Bytes this step processes in all; 0n when unknown. */
  bytesTotal: bigint;
  tablesDone: number;
  /** 0 when unknown. */
  tablesTotal: number;
  /** Time since the operation started, in milliseconds. */
  elapsedMs: number;
  /** A short note for a person, e.g. the table being dumped. */
  message: string;
}

/** One progress message of a long operation, with the backup it concerns when the message names one. */
export interface ProgressEvent extends Progress {
  /** Create: the backup being made (CREATING, then READY). Upload: the stored upload, once stored. */
  backup: Backup | undefined;
}

/** The outcome of a successful restore. */
export interface RestoreResult {
  /** The backup that was restored. */
  restored: Backup;
  /** The safety backup taken just before; undefined when it was skipped. */
  safetyBackup: Backup | undefined;
  /** Always true: connections opened before the restore must be reopened, caches reloaded. */
  reconnectRequired: boolean;
  /** The PostgreSQL channel the service sent a NOTIFY on after the restore ("aperture_backup_restored"). */
  notifyChannel: string;
  /** How long the restore took, in milliseconds. */
  durationMs: number;
}

/** The outcome of `uploadAndRestore`. */
export interface UploadResult {
  /** The upload, stored as a READY backup with trigger UPLOADED. */
  backup: Backup;
  /** The restore's outcome when `restore: true` was asked for; undefined otherwise. */
  restore: RestoreResult | undefined;
}

/** The daily backup schedule and its next run. */
export interface Schedule {
  enabled: boolean;
  /** Local time of day, "HH:MM" (24-hour clock). */
  timeOfDay: string;
  /** IANA time zone of `timeOfDay`, e.g. "Europe/Berlin". */
  timeZone: string;
  /** After start-up, run one backup at once when the newest successful one is more than a day old. */
  catchUp: boolean;
  /** When the next scheduled backup runs; undefined when disabled. */
  nextRunTime: Date | undefined;
}

/**
 * Which backups the service keeps. A backup kept by any rule is kept (as restic's `forget` combines its
 * rules); days, weeks and months are those of the schedule's time zone. Pinned backups, the newest READY
 * one, the newest verified one and uploads are never deleted.
 */
export interface RetentionPolicy {
  /** Keep the newest N READY backups (0 to 100; 0 only with another rule). */
  keepLast: number;
  /** Keep the newest backup of each of the last N days (0 to 1000); 0 when unset. */
  keepDaily?: number;
  /** Keep the newest backup of each of the last N weeks (0 to 1000); 0 when unset. */
  keepWeekly?: number;
  /** Keep the newest backup of each of the last N months (0 to 1000); 0 when unset. */
  keepMonthly?: number;
}

/** What `setRetention` did. */
export interface SetRetentionResult extends RetentionPolicy {
  /** Ids of the backups deleted by applying the new policy. */
  deletedIds: string[];
}

/** A job running now. */
export interface Job {
  kind: JobKind;
  /** The backup being made or restored. */
  backupId: string;
  trigger: BackupTrigger;
  startTime: Date | undefined;
  progress: Progress | undefined;
}

/** What `cancel()` did. */
export interface CancelResult {
  /** The job as it was when the service answered. */
  job: Job | undefined;
  /** Whether the job has stopped; false while it is still stopping (`status()` tells when it has). */
  stopped: boolean;
}

/** What `status()` tells. */
export interface ServiceStatus {
  /** The newest READY backup; undefined when there is none. */
  lastSuccessfulBackup: Backup | undefined;
  /** Age of that backup, in milliseconds. */
  lastSuccessfulAgeMs: number | undefined;
  /** The newest FAILED backup when it is newer than the last successful one. */
  lastFailedBackup: Backup | undefined;
  /** When the next scheduled backup runs; undefined when the schedule is off. */
  nextScheduledRun: Date | undefined;
  /** The job running now; undefined when idle. */
  currentJob: Job | undefined;
  /**
   * A job that was running when the service last stopped without finishing it (killed, crashed); an
   * interrupted restore was rolled back. `progress.message` says what happened. Undefined otherwise.
   */
  interruptedJob: Job | undefined;
  /** The backup verified most recently, whatever the outcome (see its `verifyResult`). */
  lastVerifiedBackup: Backup | undefined;
  /** When a verification last passed; undefined when none did. */
  lastVerifySuccessTime: Date | undefined;
  /** The database the service backs up (its name only). */
  database: string;
  /** Whether the database answers right now. */
  databaseReachable: boolean;
  /** Offsite copies; undefined when no bucket is configured. */
  offsite: OffsiteStatus | undefined;
  /** Whether backups have gone silent: no successful backup for longer than `staleAfterMs`. */
  stale: boolean;
  /** How long without a successful backup counts as silence, in milliseconds; undefined when off. */
  staleAfterMs: number | undefined;
  /** Whether notifications get through; undefined when no notification URL is configured. */
  notifications: NotificationStatus | undefined;
}

/** Where offsite copies stand. */
export interface OffsiteStatus {
  /** The bucket, as `s3://bucket/prefix/` (and its endpoint, when not AWS). */
  bucket: string;
  /** Whether the bucket answered the last request. */
  reachable: boolean;
  /** Why the last copy or listing failed, with what to do; "" when nothing failed. */
  error: string;
  /** READY archives of the directory not yet in the bucket, oldest first (retried with back-off). */
  pendingIds: string[];
  /** When the last copy finished; undefined before the first since start-up. */
  lastUploadTime: Date | undefined;
}

/** Where the notifications to the service's APERTURE_BACKUP_NOTIFY_URLS stand. */
export interface NotificationStatus {
  /** How many notification URLs are configured. */
  targets: number;
  /** Deliveries waiting to be sent or tried again. */
  pending: number;
  /** Deliveries given up after their last attempt. */
  givenUp: number;
  lastDeliveredTime: Date | undefined;
  /** The last delivery that failed (the URL named by position and scheme only) and why; "" when none. */
  lastError: string;
  lastErrorTime: Date | undefined;
}

/** A job that ended, from the job history (`listJobs`). */
export interface JobRecord {
  /** E.g. "job-000042"; grows in the order jobs ended. */
  id: string;
  /** UNSPECIFIED for a kind this client does not know yet: `description` says what it was. */
  kind: JobKind;
  trigger: BackupTrigger;
  /** "admin" or "read-only"; "" for the schedule's own jobs and when the service checks no tokens. */
  callerRole: string;
  /** The caller's address as the service saw it, e.g. "10.0.0.7:53412"; "" for the schedule's jobs. */
  callerAddress: string;
  startTime: Date | undefined;
  durationMs: number;
  outcome: JobOutcome;
  /** The backup it made, restored, verified or deleted; "" when none. */
  backupId: string;
  /** Why it failed, was cancelled or interrupted; "" when it succeeded. */
  error: string;
  /** The error's `reason`, e.g. "JOB_RUNNING"; "" when none. */
  errorReason: string;
  description: string;
  /** What it did, e.g. "deleted 2 archive(s): ..."; "" when there is nothing to add. */
  summary: string;
}

/** One page of `listJobsPage`. */
export interface JobPage {
  jobs: JobRecord[];
  /** Pass as `pageToken` for the next page; "" on the last page. */
  nextPageToken: string;
}

/** One page of `listPage`. */
export interface BackupPage {
  backups: Backup[];
  /** Pass as `pageToken` for the next page; "" on the last page. */
  nextPageToken: string;
}

/** What a download to a file did. */
export interface DownloadResult {
  /** The backup's metadata from the first message (size, SHA-256). */
  backup: Backup;
  /** The file written (the destination asked for), or undefined for a download into a Writable. */
  path: string | undefined;
  /** Bytes received by this call. */
  bytesWritten: bigint;
  /** Where this call started: the size of the partial file it resumed, else 0n. */
  resumedFrom: bigint;
  /** Whether the whole archive's SHA-256 was checked against the service's record. */
  sha256Verified: boolean;
}

/** Transfer progress of a download. */
export interface TransferProgress {
  /** Bytes of the archive in place so far (a resumed part included). */
  bytesDone: bigint;
  /** The archive's size. */
  bytesTotal: bigint;
}

/**
 * A `JSON.stringify` replacer that writes `bigint` (sizes) as decimal strings, for handing backups to a
 * browser: `JSON.stringify(backups, jsonReplacer)`.
 */
export function jsonReplacer(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? value.toString() : value;
}
