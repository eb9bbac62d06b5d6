/** Between the generated wire messages (numeric enums, int64 as decimal strings) and the client's types. */
import { TransferError } from "./errors";
import * as wire from "./generated/aperture/backup/v1/backup";
import type { Duration } from "./generated/google/protobuf/duration";
import type {
  Backup,
  BackupFormat,
  BackupState,
  BackupTrigger,
  Compression,
  Job,
  JobKind,
  JobOutcome,
  JobRecord,
  NotificationStatus,
  Phase,
  Progress,
  ProgressEvent,
  RestoreResult,
  RetentionPolicy,
  Schedule,
  ServiceStatus,
  StorageLocation,
  VerifyResult,
} from "./types";

/** A wire enum's name without its prefix ("BACKUP_STATE_READY" → "READY"); unknown values → "UNSPECIFIED". */
function unprefixed<T extends string>(name: string, prefix: string): T {
  return (name.startsWith(prefix) ? name.slice(prefix.length) : "UNSPECIFIED") as T;
}

export const backupState = (value: wire.BackupState): BackupState =>
  unprefixed(wire.backupStateToJSON(value), "BACKUP_STATE_");
export const backupFormat = (value: wire.BackupFormat): BackupFormat =>
  unprefixed(wire.backupFormatToJSON(value), "BACKUP_FORMAT_");
export const compression = (value: wire.Compression): Compression =>
  unprefixed(wire.compressionToJSON(value), "COMPRESSION_");
export const backupTrigger = (value: wire.BackupTrigger): BackupTrigger =>
  unprefixed(wire.backupTriggerToJSON(value), "BACKUP_TRIGGER_");
export const storageLocation = (value: wire.StorageLocation): StorageLocation =>
  unprefixed(wire.storageLocationToJSON(value), "STORAGE_LOCATION_");
export const phase = (value: wire.Phase): Phase => unprefixed(wire.phaseToJSON(value), "PHASE_");
export const jobKind = (value: wire.JobKind): JobKind => unprefixed(wire.jobKindToJSON(value), "JOB_KIND_");
export const verifyResult = (value: wire.VerifyResult): VerifyResult =>
  unprefixed(wire.verifyResultToJSON(value), "VERIFY_RESULT_");
export const jobOutcome = (value: wire.JobOutcome): JobOutcome =>
  unprefixed(wire.jobOutcomeToJSON(value), "JOB_OUTCOME_");

/** A request's format: undefined leaves the service's default (plain SQL). Throws on a name it does not know. */
export function formatToWire(value: BackupFormat | undefined): wire.BackupFormat {
  const wanted = value ?? "UNSPECIFIED";
  const parsed = wire.backupFormatFromJSON(`BACKUP_FORMAT_${String(wanted)}`);
  if (parsed === wire.BackupFormat.UNRECOGNIZED) {
    throw new TypeError(`format must be "PLAIN" or "CUSTOM", got ${JSON.stringify(value)}`);
  }
  return parsed;
}

/** A request's compression: undefined leaves the service's default (GZIP for plain SQL). */
export function compressionToWire(value: Compression | undefined): wire.Compression {
  const wanted = value ?? "UNSPECIFIED";
  const parsed = wire.compressionFromJSON(`COMPRESSION_${String(wanted)}`);
  if (parsed === wire.Compression.UNRECOGNIZED) {
    throw new TypeError(`compression must be "GZIP", "ZSTD" or "NONE", got ${JSON.stringify(value)}`);
  }
  return parsed;
}

/** A wire int64 (decimal string) as bigint. */
export const int64 = (value: string): bigint => BigInt(value);

/** A Duration in milliseconds. */
export function durationMs(value: Duration | undefined): number | undefined {
  return value === undefined ? undefined : Number(value.seconds) * 1000 + value.nanos / 1e6;
}

export function backup(value: wire.Backup): Backup {
  return {
    id: value.id,
    filename: value.filename,
    state: backupState(value.state),
    createTime: value.createTime,
    sizeBytes: int64(value.sizeBytes),
    sha256: value.sha256,
    format: backupFormat(value.format),
    compression: compression(value.compression),
    trigger: backupTrigger(value.trigger),
    database: value.database,
    serverVersion: value.serverVersion,
    pgDumpVersion: value.pgDumpVersion,
    durationMs: durationMs(value.duration),
    error: value.error,
    encrypted: value.encrypted,
    ageRecipients: [...value.ageRecipients],
    locations: value.locations.map(storageLocation),
    verifyTime: value.verifyTime,
    verifyResult: verifyResult(value.verifyResult),
    verifyFailedCheck: value.verifyFailedCheck,
    verifyMessage: value.verifyMessage,
    pinned: value.pinned,
    pinExpireTime: value.pinExpireTime,
    tableRows: Object.fromEntries(Object.entries(value.tableRows).map(([table, rows]) => [table, int64(rows)])),
  };
}

/** A policy as the client shows it (every rule spelled out, 0 when unset). */
export function retentionPolicy(value: wire.RetentionPolicy | undefined): Required<RetentionPolicy> {
  return {
    keepLast: value?.keepLast ?? 0,
    keepDaily: value?.keepDaily ?? 0,
    keepWeekly: value?.keepWeekly ?? 0,
    keepMonthly: value?.keepMonthly ?? 0,
  };
}

/** A policy for the wire: rules left out are 0 (not kept by that rule). */
export function retentionPolicyToWire(value: RetentionPolicy): wire.RetentionPolicy {
  return {
    keepLast: value.keepLast,
    keepDaily: value.keepDaily ?? 0,
    keepWeekly: value.keepWeekly ?? 0,
    keepMonthly: value.keepMonthly ?? 0,
  };
}

/** Milliseconds as a Duration. */
export function durationFromMs(ms: number): Duration {
  if (!Number.isFinite(ms)) {
    throw new RangeError(`a duration must be a finite number of milliseconds, got ${ms}`);
  }
  const seconds = Math.trunc(ms / 1000);
  return { seconds: String(seconds), nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

export const optionalBackup = (value: wire.Backup | undefined): Backup | undefined =>
  value === undefined ? undefined : backup(value);

export function progress(value: wire.Progress): Progress {
  return {
    phase: phase(value.phase),
    bytesDone: int64(value.bytesDone),
    bytesTotal: int64(value.bytesTotal),
    tablesDone: value.tablesDone,
    tablesTotal: value.tablesTotal,
    elapsedMs: durationMs(value.elapsed) ?? 0,
    message: value.message,
  };
}

export function progressEvent(value: wire.Progress | undefined, about: wire.Backup | undefined): ProgressEvent {
  const base: Progress =
    value === undefined
      ? { phase: "UNSPECIFIED", bytesDone: 0n, bytesTotal: 0n, tablesDone: 0, tablesTotal: 0, elapsedMs: 0, message: "" }
      : progress(value);
  return { ...base, backup: optionalBackup(about) };
}

export function restoreResult(value: wire.RestoreResult): RestoreResult {
  if (value.restored === undefined) {
    throw new TransferError("the service's restore result names no restored backup");
  }
  return {
    restored: backup(value.restored),
    safetyBackup: optionalBackup(value.safetyBackup),
    reconnectRequired: value.reconnectRequired,
    notifyChannel: value.notifyChannel,
    durationMs: durationMs(value.duration) ?? 0,
  };
}

export function schedule(value: wire.Schedule | undefined, nextRunTime: Date | undefined): Schedule {
  return {
    enabled: value?.enabled ?? false,
    timeOfDay: value?.timeOfDay ?? "",
    timeZone: value?.timeZone ?? "",
    catchUp: value?.catchUp ?? false,
    nextRunTime,
  };
}

export const optionalJob = (value: wire.Job | undefined): Job | undefined => (value === undefined ? undefined : job(value));

function job(value: wire.Job): Job {
  return {
    kind: jobKind(value.kind),
    backupId: value.backupId,
    trigger: backupTrigger(value.trigger),
    startTime: value.startTime,
    progress: value.progress === undefined ? undefined : progress(value.progress),
  };
}

export function serviceStatus(value: wire.GetStatusResponse): ServiceStatus {
  return {
    lastSuccessfulBackup: optionalBackup(value.lastSuccessfulBackup),
    lastSuccessfulAgeMs: durationMs(value.lastSuccessfulAge),
    lastFailedBackup: optionalBackup(value.lastFailedBackup),
    nextScheduledRun: value.nextScheduledRun,
    currentJob: optionalJob(value.currentJob),
    interruptedJob: optionalJob(value.interruptedJob),
    lastVerifiedBackup: optionalBackup(value.lastVerifiedBackup),
    lastVerifySuccessTime: value.lastVerifySuccessTime,
    database: value.database,
    databaseReachable: value.databaseReachable,
    offsite:
      value.offsite === undefined
        ? undefined
        : {
            bucket: value.offsite.bucket,
            reachable: value.offsite.reachable,
            error: value.offsite.error,
            pendingIds: [...value.offsite.pendingIds],
            lastUploadTime: value.offsite.lastUploadTime,
          },
    stale: value.stale,
    staleAfterMs: durationMs(value.staleAfter),
    notifications: value.notifications === undefined ? undefined : notificationStatus(value.notifications),
  };
}

function notificationStatus(value: wire.NotificationStatus): NotificationStatus {
  return {
    targets: value.targets,
    pending: value.pending,
    givenUp: value.givenUp,
    lastDeliveredTime: value.lastDeliveredTime,
    lastError: value.lastError,
    lastErrorTime: value.lastErrorTime,
  };
}

export function jobRecord(value: wire.JobRecord): JobRecord {
  return {
    id: value.id,
    kind: jobKind(value.kind),
    trigger: backupTrigger(value.trigger),
    callerRole: value.callerRole,
    callerAddress: value.callerAddress,
    startTime: value.startTime,
    durationMs: durationMs(value.duration) ?? 0,
    outcome: jobOutcome(value.outcome),
    backupId: value.backupId,
    error: value.error,
    errorReason: value.errorReason,
    description: value.description,
    summary: value.summary,
  };
}

/** A non-negative integer offset or size given as number or bigint, as bigint; RangeError otherwise. */
export function toBigInt(value: number | bigint, what: string): bigint {
  if (typeof value === "bigint") {
    if (value < 0n) {
      throw new RangeError(`${what} must not be negative, got ${value}`);
    }
    return value;
  }
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${what} must be a non-negative integer, got ${value}`);
  }
  return BigInt(value);
}
