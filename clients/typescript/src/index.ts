/**
 * The TypeScript client of aperture-backup (package aperture.backup.v1) for Node 20+, over @grpc/grpc-js.
 *
 *   const client = connect("127.0.0.1:50051", { token: process.env.BACKUP_TOKEN });
 *   const backup = await client.create({ onProgress: (p) => log(p.phase, p.bytesDone) });
 *
 * Every RPC is a typed promise (long ones an `Operation`: a promise that is also an async iterator of
 * progress); enums are string unions ("READY"), sizes `bigint`, times `Date`, durations milliseconds;
 * errors are `BackupServiceError` with the service's `reason`, and guards such as `isNotFound`. The
 * generated ts-proto messages and client are under `wire`.
 */
export { BackupClient, connect } from "./client";
export type {
  CreateOptions,
  ListOptions,
  ListPageOptions,
  OperationOptions,
  RestoreOptions,
  ScheduleChange,
} from "./client";
export type { CallOptions, ConnectOptions, TlsOptions } from "./connection";
export { MAX_MESSAGE_BYTES } from "./connection";
export { connectFromEnv, connectionFromEnv, DEFAULT_ADDRESS } from "./env";
export {
  AbortError,
  BackupServiceError,
  ChecksumMismatchError,
  ERROR_DOMAIN,
  isAbortError,
  isBackupServiceError,
  isDataLoss,
  isDeadlineExceeded,
  isFailedPrecondition,
  isInvalidArgument,
  isJobCancelled,
  isJobRunning,
  isNotFound,
  isOutOfRange,
  isPermissionDenied,
  isResourceExhausted,
  isUnauthenticated,
  isUnavailable,
  type StatusCodeName,
  TransferError,
} from "./errors";
export { Operation } from "./operation";
export {
  type DownloadOptions,
  MAX_CHUNK_BYTES,
  PARTIAL_SUFFIX,
  UPLOAD_CHUNK_BYTES,
  type UploadOptions,
  type UploadSource,
} from "./transfers";
export * from "./types";
export { status as GrpcStatus, Metadata } from "@grpc/grpc-js";

/** The generated wire layer (ts-proto): messages with numeric enums and int64 strings, and the raw client. */
export * as wire from "./generated/aperture/backup/v1/backup";
