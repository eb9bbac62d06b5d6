/**
 * What the client rejects with: `BackupServiceError` for a status the service (or grpc-js) reported,
 * `TransferError` / `ChecksumMismatchError` when a transfer does not give what the service promised, and
 * `AbortError` when the caller's AbortSignal cancelled the call. Guards (`isNotFound`, `isJobRunning`, ...)
 * take `unknown`, so they can be used in any `catch`.
 */
import { Metadata, type ServiceError, status as GrpcStatus } from "@grpc/grpc-js";

import { ErrorInfo } from "./generated/google/rpc/error_details";
import { Status as RpcStatus } from "./generated/google/rpc/status";

/** The `ErrorInfo.domain` of every error the service sends. */
export const ERROR_DOMAIN = "backup.aperture.dev";

/** The gRPC status codes by name, as `BackupServiceError.codeName` spells them. */
export type StatusCodeName =
  | "OK"
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

const CODE_NAMES: readonly StatusCodeName[] = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

/**
 * A call ended with a non-OK gRPC status. `reason`, `domain` and `metadata` come from the
 * `google.rpc.ErrorInfo` detail the service attaches (`grpc-status-details-bin`); they are empty for a
 * status that did not come from the service (for example UNAVAILABLE when nothing listens).
 */
export class BackupServiceError extends Error {
  override readonly name = "BackupServiceError";
  /** The numeric gRPC status code (`GrpcStatus.NOT_FOUND` is 5). */
  readonly code: GrpcStatus;
  /** The status code by name, for example "NOT_FOUND". */
  readonly codeName: StatusCodeName;
  /** The service's message, meant for a person. */
  readonly details: string;
  /** The ErrorInfo reason a program branches on, for example "JOB_RUNNING"; "" when there is none. */
  readonly reason: string;
  /** The ErrorInfo domain, "backup.aperture.dev" for the service's own errors; "" when there is none. */
  readonly domain: string;
  /** The ErrorInfo metadata (string keys and values); empty when there is none. */
  readonly metadata: Readonly<Record<string, string>>;
  /** The status's trailing gRPC metadata, as received. */
  readonly trailers: Metadata;

  constructor(code: GrpcStatus, details: string, trailers: Metadata = new Metadata(), options?: ErrorOptions) {
    const codeName = CODE_NAMES[code] ?? "UNKNOWN";
    super(`${codeName}: ${details}`, options);
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.trailers = trailers;
    const info = decodeErrorInfo(trailers);
    this.reason = info?.reason ?? "";
    this.domain = info?.domain ?? "";
    this.metadata = Object.freeze({ ...(info?.metadata ?? {}) });
  }

  /** The error for a grpc-js ServiceError (kept as `cause`). */
  static fromServiceError(error: ServiceError): BackupServiceError {
    return new BackupServiceError(error.code, error.details, error.metadata ?? new Metadata(), { cause: error });
  }
}

/**
 * A call did not give what the service promised: a download with a gap or cut short, an upload source
 * whose size differs from `sizeBytes`, a long operation that ended without its result, a response
 * without the backup it must carry.
 */
export class TransferError extends Error {
  override name = "TransferError";
}

/** What was downloaded has a different SHA-256 than the service's record; no file is left under its name. */
export class ChecksumMismatchError extends TransferError {
  override name = "ChecksumMismatchError";
  constructor(
    message: string,
    /** The SHA-256 the service announced. */
    readonly expected: string,
    /** The SHA-256 of what arrived. */
    readonly actual: string,
  ) {
    super(message);
  }
}

/**
 * The caller's AbortSignal cancelled the operation. `name` is "AbortError" and `code` "ABORT_ERR" as for
 * Node's own aborted operations; `cause` is the signal's reason.
 */
export class AbortError extends Error {
  override readonly name = "AbortError";
  readonly code = "ABORT_ERR";
  constructor(message = "The operation was aborted", options?: ErrorOptions) {
    super(message, options);
  }
}

function decodeErrorInfo(trailers: Metadata): ErrorInfo | undefined {
  const [raw] = trailers.get("grpc-status-details-bin");
  if (!(raw instanceof Buffer)) {
    return undefined;
  }
  try {
    const detail = RpcStatus.decode(raw).details.find((any) => any.typeUrl.endsWith("/google.rpc.ErrorInfo"));
    return detail === undefined ? undefined : ErrorInfo.decode(detail.value);
  } catch {
    // A malformed detail must not hide the status itself.
    return undefined;
  }
}

function isGrpcServiceError(error: unknown): error is ServiceError {
  return (
    error instanceof Error &&
    typeof (error as Partial<ServiceError>).code === "number" &&
    (error as Partial<ServiceError>).metadata instanceof Metadata
  );
}

/**
 * The error a caller sees for `error`: AbortError when `signal` was aborted (grpc-js reports that as
 * CANCELLED), a BackupServiceError for a grpc-js status, anything else unchanged.
 */
export function toClientError(error: unknown, signal?: AbortSignal): unknown {
  if (signal?.aborted && !(error instanceof AbortError)) {
    return abortError(signal);
  }
  if (error instanceof BackupServiceError || !isGrpcServiceError(error)) {
    return error;
  }
  return BackupServiceError.fromServiceError(error);
}

/** An AbortError for `signal`, carrying its reason. */
export function abortError(signal: AbortSignal): AbortError {
  const reason: unknown = signal.reason;
  const detail = reason instanceof Error && reason.name !== "AbortError" ? `: ${reason.message}` : "";
  return new AbortError(`The operation was aborted${detail}`, { cause: reason });
}

/** Whether `error` is a status from the service or from grpc-js. */
export function isBackupServiceError(error: unknown): error is BackupServiceError {
  return error instanceof BackupServiceError;
}

function hasCode(error: unknown, code: GrpcStatus): error is BackupServiceError {
  return error instanceof BackupServiceError && error.code === code;
}

/** NOT_FOUND: no backup with that id (Get, Delete, Restore, download). */
export const isNotFound = (error: unknown): error is BackupServiceError => hasCode(error, GrpcStatus.NOT_FOUND);
/** FAILED_PRECONDITION with reason JOB_RUNNING: another backup or restore runs; try again later. */
export const isJobRunning = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.FAILED_PRECONDITION) && error.reason === "JOB_RUNNING";
/** ABORTED with reason CANCELLED: a Cancel call (or the service's shutdown) stopped this job. */
export const isJobCancelled = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.ABORTED) && error.reason === "CANCELLED";
/** UNAUTHENTICATED: the token is missing or wrong. */
export const isUnauthenticated = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.UNAUTHENTICATED);
/** PERMISSION_DENIED: the token may not do this (a read-only token on a write call). */
export const isPermissionDenied = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.PERMISSION_DENIED);
/** INVALID_ARGUMENT: the request itself is wrong (bad id, bad schedule, ...). */
export const isInvalidArgument = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.INVALID_ARGUMENT);
/** FAILED_PRECONDITION, for any reason (JOB_RUNNING, BACKUP_IN_PROGRESS, ARCHIVE_TOO_NEW, ...). */
export const isFailedPrecondition = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.FAILED_PRECONDITION);
/** OUT_OF_RANGE: a download offset past the end of the archive. */
export const isOutOfRange = (error: unknown): error is BackupServiceError => hasCode(error, GrpcStatus.OUT_OF_RANGE);
/** RESOURCE_EXHAUSTED: too large, or not enough disk space on the service. */
export const isResourceExhausted = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.RESOURCE_EXHAUSTED);
/** DATA_LOSS: an archive is corrupt or does not match its checksum. */
export const isDataLoss = (error: unknown): error is BackupServiceError => hasCode(error, GrpcStatus.DATA_LOSS);
/** UNAVAILABLE: the service (or its database) cannot be reached right now; trying again may work. */
export const isUnavailable = (error: unknown): error is BackupServiceError => hasCode(error, GrpcStatus.UNAVAILABLE);
/** DEADLINE_EXCEEDED: the call's deadline (`timeoutMs` / `deadline`) passed. */
export const isDeadlineExceeded = (error: unknown): error is BackupServiceError =>
  hasCode(error, GrpcStatus.DEADLINE_EXCEEDED);
/** An AbortSignal cancelled the call (this package's AbortError, or any other error named "AbortError"). */
export const isAbortError = (error: unknown): error is Error => error instanceof Error && error.name === "AbortError";
