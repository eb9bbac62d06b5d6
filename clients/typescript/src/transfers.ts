/**
 * Moving archives: downloads into a file (resumable, checked, published by rename) or a Writable, and
 * uploads from a file or a Node stream. Both directions keep memory flat: a download writes each chunk
 * before it reads the next (the gRPC stream's flow control holds the service back meanwhile), and an
 * upload waits for `'drain'` whenever `call.write()` returns false.
 */
import { createHash, type Hash } from "node:crypto";
import { once } from "node:events";
import { createReadStream } from "node:fs";
import { type FileHandle, mkdtemp, open, rename, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";

import type { BackupServiceClient, UploadAndRestoreRequest, UploadAndRestoreResponse } from "./generated/aperture/backup/v1/backup";
import * as convert from "./conversions";
import { type CallContext, type CallOptions, serverStream, throwIfAborted } from "./connection";
import { abortError, ChecksumMismatchError, isOutOfRange, TransferError } from "./errors";
import type { Backup, DownloadResult, ProgressEvent, TransferProgress, UploadResult } from "./types";

/** Upload chunk size: large enough to amortise per-message cost, far below the message limit. */
export const UPLOAD_CHUNK_BYTES = 1024 * 1024;
/** The service's largest download chunk, and this client's largest upload chunk. */
export const MAX_CHUNK_BYTES = 4 * 1024 * 1024;
/** What a download into a file writes to until the archive is complete and checked. */
export const PARTIAL_SUFFIX = ".part";

export interface DownloadOptions extends CallOptions {
  /**
   * Into a file: continue `<dest>.part` left by an earlier, broken download from its size (its bytes are
   * hashed, not fetched again). Without it a download starts from byte 0.
   */
  resume?: boolean;
  /** Into a Writable: the byte offset to start from (the SHA-256 is checked only from 0). */
  offset?: number | bigint;
  /** Bytes per chunk; the service's default (1 MiB) when unset; at most 4 MiB. */
  chunkSize?: number;
  /** Called after each chunk is written. */
  onProgress?: (progress: TransferProgress) => void;
  /** Into a Writable: end it (and wait for 'finish') when the download is complete. Default true. */
  end?: boolean;
}

function chunkSizeOf(value: number | undefined, what: string): number {
  if (value === undefined) {
    return 0;
  }
  if (!Number.isSafeInteger(value) || value <= 0 || value > MAX_CHUNK_BYTES) {
    throw new RangeError(`${what} must be an integer from 1 to ${MAX_CHUNK_BYTES}, got ${value}`);
  }
  return value;
}

async function hashPrefix(path: string, length: bigint, hash: Hash, signal: AbortSignal | undefined): Promise<void> {
  if (length === 0n) {
    return;
  }
  const stream = createReadStream(path, { start: 0, end: Number(length) - 1, highWaterMark: 1024 * 1024, signal });
  for await (const piece of stream as AsyncIterable<Buffer>) {
    hash.update(piece);
  }
}

interface Receiver {
  /** Called once with the backup from the first message, before any data. */
  begin(backup: Backup): Promise<void>;
  write(data: Buffer, position: bigint): Promise<void>;
}

/** The StreamDownload loop shared by both destinations: order, size and SHA-256 checks. */
async function receive(
  raw: BackupServiceClient,
  context: CallContext,
  id: string,
  offset: bigint,
  hash: Hash | undefined,
  receiver: Receiver,
  options: DownloadOptions,
): Promise<{ backup: Backup; digest: string | undefined }> {
  const call = raw.streamDownload(
    { id, offset: offset.toString(), chunkSize: chunkSizeOf(options.chunkSize, "chunkSize") },
    context.metadata(options),
    context.callOptions(options, false),
  );
  let backup: Backup | undefined;
  let position = offset;
  for await (const message of serverStream(call, options.signal)) {
    if (backup === undefined) {
      if (message.backup === undefined) {
        throw new TransferError(`StreamDownload ${id}: the first message carries no backup metadata`);
      }
      backup = convert.backup(message.backup);
      await receiver.begin(backup);
    }
    if (message.data.length === 0) {
      continue;
    }
    if (BigInt(message.offset) !== position) {
      throw new TransferError(`StreamDownload ${id}: a chunk at offset ${message.offset}, expected ${position}`);
    }
    hash?.update(message.data);
    await receiver.write(message.data, position);
    position += BigInt(message.data.length);
    options.onProgress?.({ bytesDone: position, bytesTotal: backup.sizeBytes });
  }
  if (backup === undefined) {
    throw new TransferError(`StreamDownload ${id}: the service ended the stream without the backup's metadata`);
  }
  if (position !== backup.sizeBytes) {
    throw new TransferError(
      `the download of ${id} ended at byte ${position} of ${backup.sizeBytes}; resume it to fetch the rest`,
    );
  }
  return { backup, digest: hash?.digest("hex") };
}

/**
 * Downloads into the file `dest`: writes `<dest>.part`, checks size and SHA-256, fsyncs, then renames it
 * to `dest`. A checksum mismatch removes the part (resuming it would only repeat the mismatch); any
 * other failure keeps it for `{ resume: true }`, unless nothing was received; a part longer than the
 * archive (OUT_OF_RANGE) is discarded and the download starts over. A NOT_FOUND creates no file.
 */
export async function downloadToFile(
  raw: BackupServiceClient,
  context: CallContext,
  id: string,
  dest: string,
  options: DownloadOptions,
): Promise<DownloadResult> {
  throwIfAborted(options.signal);
  if (options.offset !== undefined) {
    throw new TypeError("offset is for a download into a Writable; a download into a file resumes with { resume: true }");
  }
  const part = dest + PARTIAL_SUFFIX;
  let offset = 0n;
  if (options.resume) {
    try {
      offset = BigInt((await stat(part)).size);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") {
        throw error;
      }
    }
  }
  const hash = createHash("sha256");
  await hashPrefix(part, offset, hash, options.signal);

  let handle: FileHandle | undefined;
  let received = 0n;
  const receiver: Receiver = {
    async begin() {
      // Opened only once the service has answered: an unknown id leaves no empty file behind.
      handle = await open(part, offset > 0n ? "r+" : "w", 0o600);
      if (offset > 0n) {
        await handle.truncate(Number(offset));
      }
    },
    async write(data, position) {
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await (handle as FileHandle).write(data, done, data.length - done, Number(position) + done);
        done += bytesWritten;
      }
      received += BigInt(data.length);
    },
  };
  let result: { backup: Backup; digest: string | undefined };
  try {
    try {
      result = await receive(raw, context, id, offset, hash, receiver, options);
    } catch (error) {
      if (offset > 0n && isOutOfRange(error)) {
        // The part is longer than the archive, so it is not a piece of it: start over.
        await rm(part, { force: true });
        return await downloadToFile(raw, context, id, dest, { ...options, resume: false });
      }
      throw error;
    }
    if (result.digest !== result.backup.sha256) {
      throw new ChecksumMismatchError(
        `the download of ${id} has SHA-256 ${result.digest}, the service's record says ${result.backup.sha256}; ` +
          "it was removed, download it again",
        result.backup.sha256,
        result.digest ?? "",
      );
    }
    await (handle as FileHandle).sync();
  } catch (error) {
    await handle?.close();
    const keep = !(error instanceof ChecksumMismatchError) && offset + received > 0n;
    if (handle !== undefined && !keep) {
      await rm(part, { force: true });
    }
    throw error;
  }
  await (handle as FileHandle).close();
  await rename(part, dest);
  await syncDirectory(dirname(dest));
  return { backup: result.backup, path: dest, bytesWritten: received, resumedFrom: offset, sha256Verified: true };
}

async function syncDirectory(path: string): Promise<void> {
  // Makes the rename durable; some file systems refuse to fsync a directory, which is no reason to fail.
  try {
    const directory = await open(path, "r");
    try {
      await directory.sync();
    } finally {
      await directory.close();
    }
  } catch {
    /* best effort */
  }
}

/**
 * Downloads into `writable` from `options.offset` (default 0), honouring its back-pressure. Checks order
 * and size; from offset 0 also the SHA-256. On failure the writable is not ended, so the caller can decide.
 */
export async function downloadToWritable(
  raw: BackupServiceClient,
  context: CallContext,
  id: string,
  writable: NodeJS.WritableStream,
  options: DownloadOptions,
): Promise<DownloadResult> {
  throwIfAborted(options.signal);
  if (options.resume) {
    throw new TypeError("resume is for a download into a file; into a Writable pass { offset }");
  }
  const offset = convert.toBigInt(options.offset ?? 0, "offset");
  const signal = options.signal;
  let received = 0n;
  const receiver: Receiver = {
    async begin() {},
    async write(data) {
      received += BigInt(data.length);
      if (!writable.write(data)) {
        await once(writable, "drain", signal === undefined ? {} : { signal });
      }
    },
  };
  let result: { backup: Backup; digest: string | undefined };
  try {
    result = await receive(raw, context, id, offset, offset === 0n ? createHash("sha256") : undefined, receiver, options);
  } catch (error) {
    throw signal?.aborted ? abortError(signal) : error;
  }
  if (result.digest !== undefined && result.digest !== result.backup.sha256) {
    throw new ChecksumMismatchError(
      `the download of ${id} has SHA-256 ${result.digest}, the service's record says ${result.backup.sha256}`,
      result.backup.sha256,
      result.digest,
    );
  }
  if (options.end ?? true) {
    writable.end();
    await once(writable, "finish");
  }
  return {
    backup: result.backup,
    path: undefined,
    bytesWritten: received,
    resumedFrom: offset,
    sha256Verified: result.digest !== undefined,
  };
}

/** What `uploadAndRestore` reads: a file's path, or a Node stream (any async iterable of bytes). */
export type UploadSource = string | AsyncIterable<Uint8Array>;

export interface UploadOptions extends CallOptions {
  /** Restore the archive once it is stored and checked. Default false: only store it. */
  restore?: boolean;
  /** Skip the safety backup the service otherwise takes before the restore. */
  skipSafetyBackup?: boolean;
  /** Informative name; the file's own name by default. */
  filename?: string;
  /**
   * Exact size of a stream in bytes: it is then sent as it is read. Without it, a stream is first
   * spooled to a temporary file (in `spoolDirectory`), which also gives the service its SHA-256 to check.
   * For a file, taken from the file.
   */
  sizeBytes?: number | bigint;
  /** Where a stream of unknown size is spooled; the system's temporary directory by default. */
  spoolDirectory?: string;
  /** SHA-256 (lowercase hex) the service checks the upload against; computed from a file when unset. */
  sha256?: string;
  /** Bytes per chunk, default 1 MiB, at most 4 MiB. */
  chunkSize?: number;
  /** The service's progress events: UPLOADING (bytes received), VERIFYING, SAFETY_BACKUP, RESTORING, DONE. */
  onProgress?: (event: ProgressEvent) => void;
}

/** Writes `source` into a new private temporary directory; its file's path and SHA-256. */
async function spool(
  source: AsyncIterable<unknown>,
  directory: string,
  signal: AbortSignal,
): Promise<{ path: string; sha256: string }> {
  const folder = await mkdtemp(join(directory, "aperture-backup-upload-"));
  const path = join(folder, "upload");
  const hash = createHash("sha256");
  try {
    const handle = await open(path, "wx", 0o600);
    try {
      for await (const piece of rechunk(source, UPLOAD_CHUNK_BYTES)) {
        throwIfAborted(signal);
        hash.update(piece);
        let done = 0;
        while (done < piece.length) {
          done += (await handle.write(piece, done, piece.length - done)).bytesWritten;
        }
      }
    } finally {
      await handle.close();
    }
  } catch (error) {
    await rm(folder, { recursive: true, force: true });
    throw error;
  }
  return { path, sha256: hash.digest("hex") };
}

/** Chunks of exactly `size` bytes (the last may be shorter) from any stream of byte pieces. */
async function* rechunk(source: AsyncIterable<unknown>, size: number): AsyncGenerator<Buffer> {
  let parts: Buffer[] = [];
  let pending = 0;
  for await (const piece of source) {
    if (!(piece instanceof Uint8Array)) {
      throw new TypeError("an upload stream must yield bytes (Buffer or Uint8Array); do not set an encoding on it");
    }
    let rest = Buffer.isBuffer(piece) ? piece : Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
    while (rest.length > 0) {
      const take = Math.min(size - pending, rest.length);
      parts.push(rest.subarray(0, take));
      pending += take;
      rest = rest.subarray(take);
      if (pending === size) {
        yield parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts, pending);
        parts = [];
        pending = 0;
      }
    }
  }
  if (pending > 0) {
    yield Buffer.concat(parts, pending);
  }
}

async function fileSha256(path: string, signal: AbortSignal | undefined): Promise<string> {
  const hash = createHash("sha256");
  for await (const piece of createReadStream(path, { highWaterMark: 1024 * 1024, signal }) as AsyncIterable<Buffer>) {
    hash.update(piece);
  }
  return hash.digest("hex");
}

/**
 * Sends an archive through UploadAndRestore: metadata, then chunks in order, each write waiting for
 * 'drain' when grpc-js says its buffer is full. `emit` gets the service's progress events.
 */
export async function upload(
  raw: BackupServiceClient,
  context: CallContext,
  source: UploadSource,
  options: UploadOptions,
  signal: AbortSignal,
  emit: (event: ProgressEvent) => void,
): Promise<UploadResult> {
  throwIfAborted(signal);
  const chunkSize = options.chunkSize === undefined ? UPLOAD_CHUNK_BYTES : chunkSizeOf(options.chunkSize, "chunkSize");
  let size: bigint;
  let sha256 = options.sha256 ?? "";
  let filename = options.filename ?? "";
  let stream: AsyncIterable<unknown>;
  if (typeof source === "string") {
    size = BigInt((await stat(source)).size);
    if (options.sizeBytes !== undefined && convert.toBigInt(options.sizeBytes, "sizeBytes") !== size) {
      throw new RangeError(`sizeBytes is ${options.sizeBytes}, but ${source} has ${size} bytes`);
    }
    filename ||= basename(source);
    sha256 ||= await fileSha256(source, signal);
    stream = createReadStream(source, { highWaterMark: chunkSize, signal });
  } else if (options.sizeBytes === undefined) {
    // The service needs the size first: spool the stream to a temporary file (hashed on the way, so the
    // service checks the SHA-256 too), send that, and remove it.
    const spooled = await spool(source, options.spoolDirectory ?? tmpdir(), signal);
    try {
      return await upload(raw, context, spooled.path, { ...options, sha256: spooled.sha256, filename }, signal, emit);
    } finally {
      await rm(dirname(spooled.path), { recursive: true, force: true });
    }
  } else {
    size = convert.toBigInt(options.sizeBytes, "sizeBytes");
    stream = source;
  }
  if (sha256 !== "" && !/^[0-9a-f]{64}$/.test(sha256)) {
    throw new TypeError(`sha256 must be 64 lowercase hex digits, got ${JSON.stringify(sha256)}`);
  }
  throwIfAborted(signal);

  const call = raw.uploadAndRestore(context.metadata(options), context.callOptions(options, false));
  // Aborted when the response side ends (result or error): writing has no purpose after that.
  const stopWriting = new AbortController();
  let writeError: { error: unknown } | undefined;

  const write = async (message: UploadAndRestoreRequest): Promise<void> => {
    if (!call.write(message)) {
      await once(call, "drain", { signal: stopWriting.signal });
    }
  };
  const writing = (async () => {
    try {
      await write({
        metadata: {
          filename,
          sizeBytes: size.toString(),
          sha256,
          restore: options.restore ?? false,
          skipSafetyBackup: options.skipSafetyBackup ?? false,
        },
      });
      let offset = 0n;
      for await (const data of rechunk(stream, chunkSize)) {
        if (stopWriting.signal.aborted) {
          return;
        }
        if (offset + BigInt(data.length) > size) {
          throw new TransferError(`the upload source has more than the ${size} bytes sizeBytes announced`);
        }
        await write({ chunk: { offset: offset.toString(), data } });
        offset += BigInt(data.length);
      }
      if (offset !== size) {
        throw new TransferError(`the upload source ended after ${offset} of the ${size} bytes sizeBytes announced`);
      }
      call.end();
    } catch (error) {
      if (!stopWriting.signal.aborted) {
        writeError = { error };
        call.cancel();
      }
    }
  })();

  let backup: Backup | undefined;
  let restore: UploadAndRestoreResponse["result"];
  try {
    for await (const message of serverStream(call, signal)) {
      if (message.backup !== undefined) {
        backup = convert.backup(message.backup);
      }
      restore = message.result ?? restore;
      emit(convert.progressEvent(message.progress, message.backup));
    }
  } catch (error) {
    throw writeError === undefined || signal.aborted ? error : writeError.error;
  } finally {
    stopWriting.abort();
  }
  await writing;
  if (writeError !== undefined) {
    throw writeError.error;
  }
  if (backup === undefined) {
    throw new TransferError("the service closed the upload without reporting the stored backup");
  }
  if ((options.restore ?? false) && restore === undefined) {
    throw new TransferError("the service closed the upload without the restore's result");
  }
  return { backup, restore: restore === undefined ? undefined : convert.restoreResult(restore) };
}
