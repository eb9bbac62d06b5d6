/** The typed promise API over the generated grpc-js client: one method per RPC. */
import { type ChannelCredentials, type ClientOptions, status as GrpcStatus } from "@grpc/grpc-js";

import * as wire from "./generated/aperture/backup/v1/backup";
import * as convert from "./conversions";
import {
  CallContext,
  type CallOptions,
  type ConnectOptions,
  channelCredentials,
  MAX_MESSAGE_BYTES,
  serverStream,
  throwIfAborted,
  unary,
} from "./connection";
import { abortError, BackupServiceError, TransferError } from "./errors";
import { Operation } from "./operation";
import {
  type DownloadOptions,
  downloadToFile,
  downloadToWritable,
  upload,
  type UploadOptions,
  type UploadSource,
} from "./transfers";
import type {
  Backup,
  BackupFormat,
  BackupPage,
  CancelResult,
  Compression,
  DownloadResult,
  JobPage,
  JobRecord,
  ProgressEvent,
  RestoreResult,
  RetentionPolicy,
  Schedule,
  ServiceStatus,
  SetRetentionResult,
  UploadResult,
} from "./types";

/** Options of a long operation: progress as a callback (or iterate the returned Operation). */
export interface OperationOptions extends CallOptions {
  onProgress?: (event: ProgressEvent) => void;
  /**
   * When `signal` aborts, also stop the job on the service (the Cancel RPC) before rejecting: a backup
   * ends FAILED and keeps nothing, a restore is rolled back. Without it an abort only stops waiting and
   * the service finishes the job. A backup can be named, and so cancelled, from its first progress event
   * on; an upload's restore once the upload is stored.
   */
  cancelJobOnAbort?: boolean;
}

export interface CreateOptions extends OperationOptions {
  /** "PLAIN" (default, psql) or "CUSTOM" (pg_restore). */
  format?: Exclude<BackupFormat, "UNSPECIFIED">;
  /** "GZIP" (the default for plain SQL), "ZSTD" or "NONE"; a custom archive only allows "NONE". */
  compression?: Exclude<Compression, "UNSPECIFIED">;
}

export interface RestoreOptions extends OperationOptions {
  /** Skip the safety backup the service otherwise takes first. */
  skipSafetyBackup?: boolean;
}

export interface ListOptions extends CallOptions {
  /** Backups per request while following pages; the service's default (50) when unset. */
  pageSize?: number;
}

export interface ListPageOptions extends ListOptions {
  /** `nextPageToken` of the previous page; "" or unset for the first. */
  pageToken?: string;
}

/** Fields left unset keep their current value. */
export interface ScheduleChange {
  enabled?: boolean;
  /** "HH:MM", 24-hour clock. */
  timeOfDay?: string;
  /** IANA time zone, e.g. "Europe/Berlin". */
  timeZone?: string;
  catchUp?: boolean;
}

function requireBackup(response: { backup?: wire.Backup | undefined }, what: string): Backup {
  if (response.backup === undefined) {
    throw new TransferError(`${what}: the service's response carries no backup`);
  }
  return convert.backup(response.backup);
}

/**
 * An AbortSignal that aborts when the caller's does, or when the client itself cancels (a progress
 * callback that threw).
 */
function linkedSignal(signal: AbortSignal | undefined): AbortController {
  const controller = new AbortController();
  if (signal?.aborted) {
    controller.abort(signal.reason);
  } else {
    signal?.addEventListener("abort", () => controller.abort(signal.reason), { once: true });
  }
  return controller;
}

/** A client of one aperture-backup service. Make it with `connect()`; `close()` it when done. */
export class BackupClient {
  /** The generated grpc-js client underneath (ts-proto), for anything this API does not cover. */
  readonly raw: wire.BackupServiceClient;
  readonly #context: CallContext;

  constructor(address: string, options: ConnectOptions = {}) {
    const { credentials, channelOptions } = channelCredentials(options);
    this.#context = new CallContext(options);
    this.raw = new wire.BackupServiceClient(address, credentials as ChannelCredentials, {
      "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
      "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
      ...channelOptions,
      ...options.channelOptions,
    } satisfies Partial<ClientOptions>);
  }

  /**
   * Runs a backup now; resolves with the READY backup. Progress (PREPARING, DUMPING, FINALIZING, DONE)
   * goes to `onProgress` or to whoever iterates the Operation. Rejects with FAILED_PRECONDITION, reason
   * JOB_RUNNING (`isJobRunning`), while another backup or restore runs. An abort stops waiting; the
   * service finishes the backup all the same.
   */
  create(options: CreateOptions = {}): Operation<Backup> {
    const request: wire.CreateRequest = {
      format: convert.formatToWire(options.format),
      compression: convert.compressionToWire(options.compression),
    };
    return this.#streaming(options, async (signal, emit) => {
      const call = this.raw.create(request, this.#context.metadata(options), this.#context.callOptions(options, false));
      let last: Backup | undefined;
      for await (const message of serverStream(call, signal)) {
        last = convert.optionalBackup(message.backup) ?? last;
        emit(convert.progressEvent(message.progress, message.backup));
      }
      if (last === undefined || last.state !== "READY") {
        throw new TransferError(`Create ended without a READY backup (last state: ${last?.state ?? "none"})`);
      }
      return last;
    });
  }

  /** Every backup, newest first, following page tokens to the last page. */
  async list(options: ListOptions = {}): Promise<Backup[]> {
    const backups: Backup[] = [];
    for await (const backup of this.iterate(options)) {
      backups.push(backup);
    }
    return backups;
  }

  /** Every backup, newest first, fetched a page at a time as the loop goes on. */
  async *iterate(options: ListOptions = {}): AsyncGenerator<Backup> {
    let pageToken = "";
    do {
      const page = await this.listPage({ ...options, pageToken });
      yield* page.backups;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /** One page of backups, newest first. */
  async listPage(options: ListPageOptions = {}): Promise<BackupPage> {
    const response = await unary(
      this.#context,
      this.raw.list.bind(this.raw),
      { pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" },
      options,
    );
    return { backups: response.backups.map(convert.backup), nextPageToken: response.nextPageToken };
  }

  /** One backup; rejects with NOT_FOUND (`isNotFound`) when there is none. */
  async get(id: string, options?: CallOptions): Promise<Backup> {
    return requireBackup(await unary(this.#context, this.raw.get.bind(this.raw), { id }, options), "Get");
  }

  /** Deletes a backup (archive and manifest); resolves with it as it was. */
  async delete(id: string, options?: CallOptions): Promise<Backup> {
    return requireBackup(await unary(this.#context, this.raw.delete.bind(this.raw), { id }, options), "Delete");
  }

  /** The job history, newest first: every job that ended (up to the service's last 200), following pages. */
  async listJobs(options: ListOptions = {}): Promise<JobRecord[]> {
    const jobs: JobRecord[] = [];
    let pageToken = "";
    do {
      const page = await this.listJobsPage({ ...options, pageToken });
      jobs.push(...page.jobs);
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    return jobs;
  }

  /** One page of the job history, newest first. */
  async listJobsPage(options: ListPageOptions = {}): Promise<JobPage> {
    const response = await unary(
      this.#context,
      this.raw.listJobs.bind(this.raw),
      { pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" },
      options,
    );
    return { jobs: response.jobs.map(convert.jobRecord), nextPageToken: response.nextPageToken };
  }

  /** The last successful backup, the next scheduled run, the job running now, whether the database answers. */
  async status(options?: CallOptions): Promise<ServiceStatus> {
    return convert.serviceStatus(await unary(this.#context, this.raw.getStatus.bind(this.raw), {}, options));
  }

  /** The retention policy in force, every rule spelled out (0: not used). */
  async getRetention(options?: CallOptions): Promise<Required<RetentionPolicy>> {
    const response = await unary(this.#context, this.raw.getRetention.bind(this.raw), {}, options);
    return convert.retentionPolicy(response.policy);
  }

  /**
   * Sets the whole retention policy (rules left out are 0), applied at once; tells what it deleted. With
   * `validateOnly: true` nothing is saved or deleted: `deletedIds` says what the policy would delete (for
   * the admin page to show before the administrator saves).
   */
  async setRetention(
    policy: RetentionPolicy & { validateOnly?: boolean },
    options?: CallOptions,
  ): Promise<SetRetentionResult> {
    const response = await unary(
      this.#context,
      this.raw.setRetention.bind(this.raw),
      { policy: convert.retentionPolicyToWire(policy), validateOnly: policy.validateOnly ?? false },
      options,
    );
    return { ...convert.retentionPolicy(response.policy), deletedIds: response.deletedIds };
  }

  /**
   * Verifies a backup (the newest READY one when `id` is omitted or ""): the service restores it into a
   * scratch database beside the live one, checks tables, row counts, indexes, extensions and its operator
   * query, and drops it. Resolves with the backup and its verification when every check passed; rejects
   * with DATA_LOSS, reason VERIFY_FAILED (`isDataLoss`), when one failed (the outcome is recorded all the
   * same: `get` shows it), FAILED_PRECONDITION (VERIFY_UNAVAILABLE) when the service may not create a
   * scratch database. Progress: PREPARING, RESTORING, CHECKING, DONE.
   */
  verify(id = "", options: OperationOptions = {}): Operation<Backup> {
    return this.#streaming(options, async (signal, emit) => {
      const call = this.raw.verify({ id }, this.#context.metadata(options), this.#context.callOptions(options, false));
      let last: Backup | undefined;
      for await (const message of serverStream(call, signal)) {
        last = convert.optionalBackup(message.backup) ?? last;
        emit(convert.progressEvent(message.progress, message.backup));
      }
      if (last === undefined || last.verifyResult === "UNSPECIFIED") {
        throw new TransferError(`Verify of ${id || "the newest backup"} ended without a result`);
      }
      return last;
    });
  }

  /** Pins a backup: retention never deletes it, for `ttlMs` milliseconds or until `unpin`. */
  async pin(id: string, options: CallOptions & { ttlMs?: number } = {}): Promise<Backup> {
    const ttl = options.ttlMs === undefined ? undefined : convert.durationFromMs(options.ttlMs);
    const request: wire.PinRequest = { id, ttl };
    return requireBackup(await unary(this.#context, this.raw.pin.bind(this.raw), request, options), "Pin");
  }

  /** Removes a backup's pin; retention may delete it from its next run on. */
  async unpin(id: string, options?: CallOptions): Promise<Backup> {
    return requireBackup(await unary(this.#context, this.raw.unpin.bind(this.raw), { id }, options), "Unpin");
  }

  /** The daily schedule and its next run. */
  async getSchedule(options?: CallOptions): Promise<Schedule> {
    const response = await unary(this.#context, this.raw.getSchedule.bind(this.raw), {}, options);
    return convert.schedule(response.schedule, response.nextRunTime);
  }

  /** Changes the daily schedule (only the fields given); resolves with the schedule now in force. */
  async setSchedule(change: ScheduleChange, options?: CallOptions): Promise<Schedule> {
    const request: wire.SetScheduleRequest = {};
    if (change.enabled !== undefined) request.enabled = change.enabled;
    if (change.timeOfDay !== undefined) request.timeOfDay = change.timeOfDay;
    if (change.timeZone !== undefined) request.timeZone = change.timeZone;
    if (change.catchUp !== undefined) request.catchUp = change.catchUp;
    const response = await unary(this.#context, this.raw.setSchedule.bind(this.raw), request, options);
    return convert.schedule(response.schedule, response.nextRunTime);
  }

  /**
   * Restores a stored backup, atomically: on failure the database is as it was. Takes a safety backup
   * first unless `skipSafetyBackup`. Resolves with the result; afterwards the application must reconnect
   * (`reconnectRequired`). Rejects with JOB_RUNNING while another job runs. An abort stops waiting; the
   * service carries the restore through (or rolls it back on failure) all the same.
   */
  restore(id: string, options: RestoreOptions = {}): Operation<RestoreResult> {
    return this.#streaming(
      options,
      async (signal, emit) => {
        const call = this.raw.restore(
          { id, skipSafetyBackup: options.skipSafetyBackup ?? false },
          this.#context.metadata(options),
          this.#context.callOptions(options, false),
        );
        let result: wire.RestoreResult | undefined;
        for await (const message of serverStream(call, signal)) {
          result = message.result ?? result;
          emit(convert.progressEvent(message.progress, undefined));
        }
        if (result === undefined) {
          throw new TransferError(`Restore of ${id} ended without a result`);
        }
        return convert.restoreResult(result);
      },
      id,
    );
  }

  /**
   * Uploads an archive from a file path or a Node stream (of `sizeBytes`; one of unknown size is spooled
   * to a temporary file first), with back-pressure, so memory stays flat however large it is. The service checks it (size, SHA-256,
   * format, readable to the end), stores it as a backup with trigger UPLOADED and, with `restore: true`,
   * restores it. A refused upload leaves nothing behind on the service, and so does an abort while the
   * data is still being sent; once it is all in, the service finishes checking and restoring regardless.
   */
  uploadAndRestore(source: UploadSource, options: UploadOptions = {}): Operation<UploadResult> {
    return this.#streaming(options, (signal, emit) => upload(this.raw, this.#context, source, options, signal, emit));
  }

  /**
   * Downloads a backup's archive. Into a file path: written as `<dest>.part`, checked (size and SHA-256)
   * and renamed to `dest`; `{ resume: true }` continues a part left by a broken download. Into a
   * Writable (an HTTP response, say): from `{ offset }`, honouring its back-pressure.
   */
  download(id: string, dest: string | NodeJS.WritableStream, options: DownloadOptions = {}): Promise<DownloadResult> {
    return typeof dest === "string"
      ? downloadToFile(this.raw, this.#context, id, dest, options)
      : downloadToWritable(this.raw, this.#context, id, dest, options);
  }

  /**
   * Stops the running job, named by its backup (the one being made, or the one being restored): a backup
   * ends FAILED and keeps no archive, a restore is rolled back. The job's own call rejects with ABORTED,
   * reason CANCELLED (`isJobCancelled`). Waits a few seconds for the job to stop; `stopped` says whether
   * it has. Rejects with FAILED_PRECONDITION (reason NO_JOB) when nothing runs, NOT_FOUND (JOB_NOT_FOUND)
   * when another job runs.
   */
  async cancel(backupId: string, options?: CallOptions): Promise<CancelResult> {
    const response = await unary(this.#context, this.raw.cancel.bind(this.raw), { backupId }, options);
    return { job: convert.optionalJob(response.job), stopped: response.stopped };
  }

  /** Resolves once the channel is connected; rejects with UNAVAILABLE after `timeoutMs` (default 10 s). */
  waitForReady(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    return new Promise((resolve, reject) => {
      throwIfAborted(options.signal);
      this.raw.waitForReady(Date.now() + (options.timeoutMs ?? 10_000), (error) => {
        if (options.signal?.aborted) {
          reject(abortError(options.signal));
        } else if (error !== undefined) {
          reject(new BackupServiceError(GrpcStatus.UNAVAILABLE, error.message, undefined, { cause: error }));
        } else {
          resolve();
        }
      });
    });
  }

  /** Closes the channel; calls in flight fail with CANCELLED. */
  close(): void {
    this.raw.close();
  }

  /**
   * A long operation: `run` gets the signal (the caller's, or a progress callback's failure) and `emit`.
   * `subject` names the job for `cancelJobOnAbort` (a restore's backup); otherwise the latest backup its
   * events named does.
   */
  #streaming<T>(
    options: OperationOptions,
    run: (signal: AbortSignal, emit: (event: ProgressEvent) => void) => Promise<T>,
    subject?: string,
  ): Operation<T> {
    const controller = linkedSignal(options.signal);
    let named = subject;
    return new Operation<T>(
      async (emit) => {
        throwIfAborted(options.signal);
        try {
          return await run(controller.signal, (event) => {
            named = subject ?? event.backup?.id ?? named;
            emit(event);
          });
        } catch (error) {
          if (options.cancelJobOnAbort && options.signal?.aborted && named !== undefined) {
            // Best effort: the job may have ended meanwhile (NO_JOB), which is what the caller wanted.
            await this.cancel(named, { timeoutMs: 30_000 }).catch(() => undefined);
          }
          throw error;
        }
      },
      options.onProgress,
      (reason) => controller.abort(reason),
    );
  }
}

/** A client for the service at `address` ("host:port"): plaintext unless `tls` (or `credentials`) is given. */
export function connect(address: string, options?: ConnectOptions): BackupClient {
  return new BackupClient(address, options);
}
