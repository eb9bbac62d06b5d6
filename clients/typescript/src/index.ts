/**
 * A small promise-based client for aperture-backup (package aperture.backup.v1) over @grpc/grpc-js.
 *
 * Everything in the contract is re-exported from the generated stubs (messages, enums, the raw
 * `BackupServiceClient`); this wrapper adds what every caller would otherwise write again: collecting a
 * Create stream, following List page tokens, a resumable, checked download into a Writable, and reading
 * the `google.rpc.ErrorInfo` reason a caller branches on. int64 fields are decimal strings.
 */
import { createHash } from "node:crypto";
import { once } from "node:events";
import type { Writable } from "node:stream";

import {
  type CallOptions,
  type ChannelCredentials,
  type ClientOptions,
  type ClientReadableStream,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
  status as grpcStatus,
} from "@grpc/grpc-js";

import {
  type Backup,
  BackupFormat,
  BackupServiceClient,
  BackupState,
  Compression,
  type CreateRequest,
  type CreateResponse,
  type GetStatusResponse,
  type ListResponse,
  type Progress,
  type StreamDownloadResponse,
} from "./generated/aperture/backup/v1/backup";
import { ErrorInfo } from "./generated/google/rpc/error_details";
import { Status } from "./generated/google/rpc/status";

export * from "./generated/aperture/backup/v1/backup";
export { ErrorInfo } from "./generated/google/rpc/error_details";
export { Status as RpcStatus } from "./generated/google/rpc/status";
export { status as GrpcStatus, type ServiceError } from "@grpc/grpc-js";

/** The `ErrorInfo.domain` of every error the service sends. */
export const ERROR_DOMAIN = "backup.aperture.dev";

export interface ConnectOptions {
  /** Channel credentials; insecure (plaintext) when unset, as the service listens without TLS by default. */
  credentials?: ChannelCredentials;
  /** grpc-js channel options, for example `{"grpc.max_receive_message_length": ...}`. */
  channelOptions?: Partial<ClientOptions>;
}

/** Per-call settings: a deadline, extra metadata (for example an auth token). */
export interface RequestOptions {
  deadline?: Date | number;
  metadata?: Metadata;
}

export interface CreateResult {
  /** The finished backup (state READY). */
  backup: Backup;
  /** Every progress event of the stream, in order. */
  progress: Progress[];
}

export interface DownloadOptions extends RequestOptions {
  /** Byte offset to start from, to resume a broken download. Default 0. */
  offset?: number;
  /** Bytes per chunk (the service's default, 1 MiB, when unset; at most 4 MiB). */
  chunkSize?: number;
  /** End the writable (and wait for it to finish) when the download is complete. Default true. */
  end?: boolean;
}

export interface DownloadResult {
  /** The backup's metadata from the first message (size, SHA-256). */
  backup: Backup;
  /** Bytes written to the writable by this call. */
  bytesWritten: number;
  /** Whether the SHA-256 was checked: only when the download started at offset 0. */
  sha256Verified: boolean;
}

/** Raised by `download` when what arrived does not match the backup's metadata. */
export class DownloadIntegrityError extends Error {
  override name = "DownloadIntegrityError";
}

/** Whether `error` is a gRPC status error (it has a numeric `code` from `status`). */
export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number";
}

/** The `google.rpc.ErrorInfo` detail of a service error (its `reason`, e.g. "JOB_RUNNING"), if any. */
export function errorInfo(error: unknown): ErrorInfo | undefined {
  if (!isServiceError(error) || error.metadata === undefined) {
    return undefined;
  }
  const [raw] = error.metadata.get("grpc-status-details-bin");
  if (!(raw instanceof Buffer)) {
    return undefined;
  }
  const detail = Status.decode(raw).details.find((any) => any.typeUrl.endsWith("/google.rpc.ErrorInfo"));
  return detail === undefined ? undefined : ErrorInfo.decode(detail.value);
}

function callOptions(options: RequestOptions | undefined): Partial<CallOptions> {
  return options?.deadline === undefined ? {} : { deadline: options.deadline };
}

/** A server stream as what it is: Readable's own async iterator yields `any`. */
function messages<T>(call: ClientReadableStream<T>): AsyncIterable<T> {
  return call;
}

function metadata(options: RequestOptions | undefined): Metadata {
  return options?.metadata ?? new Metadata();
}

/** The client returned by `connect`. Call `close()` when done. */
export class ApertureBackupClient {
  /** The generated grpc-js client, for the RPCs this wrapper does not cover (Restore, UploadAndRestore, ...). */
  readonly raw: BackupServiceClient;

  constructor(target: string, options: ConnectOptions = {}) {
    this.raw = new BackupServiceClient(
      target,
      options.credentials ?? grpcCredentials.createInsecure(),
      options.channelOptions,
    );
  }

  /**
   * Runs a backup now and resolves when it is READY, with every progress event. `onProgress` sees the
   * events as they arrive. Rejects with FAILED_PRECONDITION (reason JOB_RUNNING) while another job runs.
   */
  async create(
    request: Partial<CreateRequest> = {},
    onProgress?: (progress: Progress, backup: Backup | undefined) => void,
    options?: RequestOptions,
  ): Promise<CreateResult> {
    // UNSPECIFIED lets the service choose its defaults (plain SQL through gzip).
    const full: CreateRequest = {
      format: BackupFormat.BACKUP_FORMAT_UNSPECIFIED,
      compression: Compression.COMPRESSION_UNSPECIFIED,
      ...request,
    };
    const call = this.raw.create(full, metadata(options), callOptions(options));
    const progress: Progress[] = [];
    let last: Backup | undefined;
    for await (const message of messages<CreateResponse>(call)) {
      if (message.progress !== undefined) {
        progress.push(message.progress);
        onProgress?.(message.progress, message.backup);
      }
      last = message.backup ?? last;
    }
    if (last === undefined || last.state !== BackupState.BACKUP_STATE_READY) {
      throw new Error(`Create ended without a READY backup (last state: ${last?.state ?? "none"})`);
    }
    return { backup: last, progress };
  }

  /** Every backup, newest first, following `next_page_token` until the last page. */
  async list(pageSize = 0, options?: RequestOptions): Promise<Backup[]> {
    const backups: Backup[] = [];
    let pageToken = "";
    do {
      const page = await new Promise<ListResponse>((resolve, reject) => {
        this.raw.list({ pageSize, pageToken }, metadata(options), callOptions(options), (error, response) =>
          error === null ? resolve(response) : reject(error),
        );
      });
      backups.push(...page.backups);
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    return backups;
  }

  /** One backup by id; rejects with NOT_FOUND when there is none. */
  get(id: string, options?: RequestOptions): Promise<Backup> {
    return new Promise((resolve, reject) => {
      this.raw.get({ id }, metadata(options), callOptions(options), (error, response) => {
        if (error !== null) {
          reject(error);
        } else if (response.backup === undefined) {
          reject(new Error(`Get ${id}: the response carries no backup`));
        } else {
          resolve(response.backup);
        }
      });
    });
  }

  /** The last successful backup, the next scheduled run, the running job and whether the database answers. */
  status(options?: RequestOptions): Promise<GetStatusResponse> {
    return new Promise((resolve, reject) => {
      this.raw.getStatus({}, metadata(options), callOptions(options), (error, response) =>
        error === null ? resolve(response) : reject(error),
      );
    });
  }

  /**
   * Streams an archive into `writable`, honouring its back-pressure, from `offset` on. Checks that chunks
   * are contiguous and that the total matches the backup's size; from offset 0 also checks the SHA-256.
   * Rejects with the gRPC error (NOT_FOUND, OUT_OF_RANGE, ...) or a DownloadIntegrityError; the writable is
   * not ended then, so that a caller can resume from where it stopped.
   */
  async download(id: string, writable: Writable, options: DownloadOptions = {}): Promise<DownloadResult> {
    const start = options.offset ?? 0;
    if (!Number.isSafeInteger(start) || start < 0) {
      throw new RangeError(`offset must be a non-negative integer, got ${start}`);
    }
    const call = this.raw.streamDownload(
      { id, offset: String(start), chunkSize: options.chunkSize ?? 0 },
      metadata(options),
      callOptions(options),
    );
    const hash = start === 0 ? createHash("sha256") : undefined;
    let backup: Backup | undefined;
    let position = start;
    try {
      for await (const message of messages<StreamDownloadResponse>(call)) {
        backup ??= message.backup;
        if (message.data.length === 0) {
          continue;
        }
        if (Number(message.offset) !== position) {
          throw new DownloadIntegrityError(`chunk at offset ${message.offset}, expected ${position}`);
        }
        hash?.update(message.data);
        position += message.data.length;
        if (!writable.write(message.data)) {
          await once(writable, "drain");
        }
      }
    } catch (error) {
      call.cancel();
      throw error;
    }
    if (backup === undefined) {
      throw new DownloadIntegrityError(`StreamDownload ${id}: the first message carries no backup`);
    }
    if (String(position) !== backup.sizeBytes) {
      throw new DownloadIntegrityError(`got ${position} bytes of ${id}, its size is ${backup.sizeBytes}`);
    }
    // A backup's SHA-256 is empty only while it is CREATING or FAILED, which the service does not send.
    const digest = backup.sha256 === "" ? undefined : hash?.digest("hex");
    if (digest !== undefined && digest !== backup.sha256) {
      throw new DownloadIntegrityError(`SHA-256 of ${id} is ${digest}, expected ${backup.sha256}`);
    }
    if (options.end ?? true) {
      writable.end();
      await once(writable, "finish");
    }
    return { backup, bytesWritten: position - start, sha256Verified: digest !== undefined };
  }

  /** Closes the channel. */
  close(): void {
    this.raw.close();
  }
}

/** A client for the service at `target` ("host:port"), plaintext unless `options.credentials` says otherwise. */
export function connect(target: string, options?: ConnectOptions): ApertureBackupClient {
  return new ApertureBackupClient(target, options);
}

/** Whether `error` is the NOT_FOUND status, the usual branch after Get, Delete or Restore of an unknown id. */
export function isNotFound(error: unknown): boolean {
  return isServiceError(error) && error.code === grpcStatus.NOT_FOUND;
}
