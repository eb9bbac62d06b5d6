/**
 * Drives a running aperture-backup through the package's API, one scenario per command, and prints what it
 * saw as one JSON object (bigint as decimal strings). tests/test_typescript_client.py runs it against the
 * real service and checks the printed facts against the service's disk and database.
 *
 * Usage: node drive.js COMMAND ADDRESS [ARGS...]; the environment may carry APERTURE_BACKUP_TOKEN and
 * APERTURE_BACKUP_TLS_{CA,CERT,KEY} (file names) for the connection.
 */
import { createHash } from "node:crypto";
import { once } from "node:events";
import { createReadStream, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Writable } from "node:stream";

import {
  type BackupClient,
  BackupServiceError,
  connect,
  connectionFromEnv,
  isAbortError,
  isJobCancelled,
  isJobRunning,
  isNotFound,
  jsonReplacer,
  type Phase,
  type ProgressEvent,
  isPermissionDenied,
  isUnauthenticated,
} from "../src/index";

type Json = Record<string, unknown>;

/** What a test needs to know about an error: its class and, for a status, code, reason and metadata. */
export function describeError(error: unknown): Json {
  if (error instanceof BackupServiceError) {
    return {
      name: error.name,
      code: error.code,
      codeName: error.codeName,
      details: error.details,
      reason: error.reason,
      domain: error.domain,
      metadata: error.metadata,
      message: error.message,
      guards: {
        isNotFound: isNotFound(error),
        isJobRunning: isJobRunning(error),
        isUnauthenticated: isUnauthenticated(error),
        isPermissionDenied: isPermissionDenied(error),
      },
    };
  }
  if (error instanceof Error) {
    return { name: error.name, message: error.message, isAbortError: isAbortError(error) };
  }
  return { name: "non-Error", message: String(error) };
}

async function failure(promise: PromiseLike<unknown>): Promise<Json> {
  try {
    await promise;
  } catch (error) {
    return describeError(error);
  }
  return { name: "no error" };
}

function sha256File(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** A Writable that keeps what it gets, slowly (setImmediate), so that back-pressure is exercised. */
class Collect extends Writable {
  readonly chunks: Buffer[] = [];
  constructor() {
    super({ highWaterMark: 16 * 1024 });
  }
  override _write(chunk: Buffer, _encoding: BufferEncoding, done: (error?: Error | null) => void): void {
    this.chunks.push(chunk);
    setImmediate(done);
  }
}

/** Every RPC through the typed API, on a service with a seeded database and no backups yet. */
async function everything(client: BackupClient, work: string, missingId: string): Promise<Json> {
  // Create, progress as a callback; then as an async iterator.
  const callbackEvents: ProgressEvent[] = [];
  const plain = await client.create({ onProgress: (event) => callbackEvents.push(event) });
  const op = client.create({ format: "CUSTOM", compression: "NONE" });
  const iterated: Phase[] = [];
  for await (const event of op) {
    iterated.push(event.phase);
  }
  const custom = await op;

  const listed = await client.list({ pageSize: 1 }); // two pages of one: follows the token
  const firstPage = await client.listPage({ pageSize: 1 });
  const got = await client.get(plain.id);
  const status = await client.status();

  const retentionBefore = await client.getRetention();
  // A dry run first: with two backups and one to keep, it names the older, and deletes nothing.
  const retentionDryRun = await client.setRetention({ keepLast: 1, validateOnly: true });
  const afterDryRun = (await client.list()).map((backup) => backup.id);
  const retentionSet = await client.setRetention({ keepLast: 5 });
  const retentionAfter = await client.getRetention();
  const badRetention = await failure(client.setRetention({ keepLast: 0 }));

  const scheduleBefore = await client.getSchedule();
  const scheduleOn = await client.setSchedule({ enabled: true, timeOfDay: "03:30", timeZone: "Europe/Berlin" });
  const scheduleOff = await client.setSchedule({ enabled: false });
  const badSchedule = await failure(client.setSchedule({ timeOfDay: "25:00" }));

  // Download into a file: checked, no part left.
  const whole = join(work, "whole.sql.gz");
  const download = await client.download(plain.id, whole, { chunkSize: 4096 });
  // A broken download resumed: the part holds the first half.
  const resumed = join(work, "resumed.sql.gz");
  const half = Math.floor(statSync(whole).size / 2);
  writeFileSync(`${resumed}.part`, readFileSync(whole).subarray(0, half));
  const resume = await client.download(plain.id, resumed, { resume: true, chunkSize: 4096 });
  // Aborted mid-way (after the first chunk): the part stays, no final file; resuming completes it.
  const aborted = join(work, "aborted.sql.gz");
  const controller = new AbortController();
  const abortedError = await failure(
    client.download(plain.id, aborted, { chunkSize: 1024, signal: controller.signal, onProgress: () => controller.abort() }),
  );
  const abortedPartBytes = existsSync(`${aborted}.part`) ? statSync(`${aborted}.part`).size : -1;
  const abortedFinalExists = existsSync(aborted);
  const afterAbort = await client.download(plain.id, aborted, { resume: true, chunkSize: 4096 });
  // Into a slow Writable, from offset 0 and from an offset.
  const sink = new Collect();
  const intoWritable = await client.download(plain.id, sink, { chunkSize: 4096 });
  const tail = new Collect();
  const tailResult = await client.download(plain.id, tail, { offset: half, chunkSize: 4096 });
  // An unknown id: NOT_FOUND, and no file at all.
  const missingPath = join(work, "missing.sql.gz");
  const missingDownload = await failure(client.download(missingId, missingPath));

  const missingGet = await failure(client.get(missingId));
  let guards: Json = {};
  try {
    await client.get(missingId);
  } catch (error) {
    guards = { isNotFound: isNotFound(error), isJobRunning: isJobRunning(error) };
  }
  const preAborted = await failure(client.list({ signal: AbortSignal.abort() }));

  // Upload without restore, from the file and from a Node stream.
  const uploadEvents: Phase[] = [];
  const fromFile = await client.uploadAndRestore(whole, { onProgress: (event) => uploadEvents.push(event.phase) });
  const fromStream = await client.uploadAndRestore(createReadStream(whole, { highWaterMark: 10_000 }), {
    sizeBytes: statSync(whole).size,
    filename: "wizard.sql.gz",
  });
  // A stream of unknown size: spooled to a temporary file first, then sent with its SHA-256.
  const spooled = await client.uploadAndRestore(createReadStream(whole), { spoolDirectory: work });
  const spoolLeft = readdirSync(work).filter((name) => name.startsWith("aperture-backup-upload-"));
  await client.delete(spooled.backup.id);
  const wrongSize = await failure(
    client.uploadAndRestore(createReadStream(whole), { sizeBytes: statSync(whole).size + 10 }),
  );
  // An upload aborted while its source stalls: the service keeps nothing.
  const uploadController = new AbortController();
  async function* stalling(): AsyncGenerator<Buffer> {
    yield readFileSync(whole).subarray(0, 65536);
    await once(uploadController.signal, "abort");
  }
  const uploadAborted = await failure(
    client.uploadAndRestore(stalling(), {
      sizeBytes: statSync(whole).size,
      signal: uploadController.signal,
      onProgress: () => uploadController.abort(),
    }),
  );

  const deleted = await client.delete(fromStream.backup.id);
  const deletedGet = await failure(client.get(fromStream.backup.id));
  const jobs = await client.listJobs({ pageSize: 2 });
  const jobsPage = await client.listJobsPage({ pageSize: 2 });

  return {
    plain,
    custom,
    callbackPhases: callbackEvents.map((event) => event.phase),
    callbackBackupIds: [...new Set(callbackEvents.map((event) => event.backup?.id))],
    lastCallbackState: callbackEvents.at(-1)?.backup?.state,
    iterated,
    listed: listed.map((backup) => backup.id),
    jobs,
    jobsFirstPage: { ids: jobsPage.jobs.map((job) => job.id), hasNext: jobsPage.nextPageToken !== "" },
    firstPage: { ids: firstPage.backups.map((backup) => backup.id), hasNext: firstPage.nextPageToken !== "" },
    got,
    sizeIsBigint: typeof got.sizeBytes === "bigint",
    createTimeIsDate: got.createTime instanceof Date,
    status: {
      lastSuccessfulId: status.lastSuccessfulBackup?.id ?? null,
      lastSuccessfulAgeMs: status.lastSuccessfulAgeMs,
      database: status.database,
      databaseReachable: status.databaseReachable,
      currentJob: status.currentJob ?? null,
    },
    retention: {
      before: retentionBefore,
      dryRun: retentionDryRun,
      afterDryRun,
      set: retentionSet,
      after: retentionAfter,
      bad: badRetention,
    },
    schedule: {
      before: scheduleBefore,
      on: { ...scheduleOn, nextRunIsDate: scheduleOn.nextRunTime instanceof Date },
      off: scheduleOff,
      bad: badSchedule,
    },
    download: {
      result: download,
      sha256: sha256File(whole),
      partLeft: existsSync(`${whole}.part`),
      resume,
      resumedSha256: sha256File(resumed),
      aborted: abortedError,
      abortedPartBytes,
      abortedFinalExists,
      afterAbort,
      afterAbortSha256: sha256File(aborted),
      intoWritable,
      writableSha256: createHash("sha256").update(Buffer.concat(sink.chunks)).digest("hex"),
      tail: tailResult,
      tailBytes: Buffer.concat(tail.chunks).length,
      missing: missingDownload,
      missingLeftFiles: [existsSync(missingPath), existsSync(`${missingPath}.part`)],
    },
    errors: { missingGet, guards, preAborted },
    upload: {
      fromFile,
      uploadEvents,
      fromStream,
      spooled: { backup: spooled.backup, left: spoolLeft },
      wrongSize,
      aborted: uploadAborted,
    },
    deleted,
    deletedGet,
  };
}

/** While the test holds a table lock (a backup stays running): a second job is refused, an abort rejects. */
async function jobRunning(client: BackupClient, readyId: string): Promise<Json> {
  const controller = new AbortController();
  const first = client.create({ signal: controller.signal });
  let running: ProgressEvent | undefined;
  for await (const event of first) {
    running = event; // the first event: the backup is reserved and pg_dump waits for the lock
    break;
  }
  const second = await failure(client.create());
  let secondIsJobRunning = false;
  try {
    await client.create();
  } catch (error) {
    secondIsJobRunning = isJobRunning(error);
  }
  const restore = await failure(client.restore(readyId));
  const status = await client.status();
  controller.abort();
  const aborted = await failure(first);
  return {
    runningId: running?.backup?.id,
    runningState: running?.backup?.state,
    second,
    secondIsJobRunning,
    restore,
    currentJob: status.currentJob,
    aborted,
  };
}

/**
 * While the test holds a table lock (backups stay running): an abort with cancelJobOnAbort stops the
 * backup on the service, and so does cancel() from another caller; with nothing running, NO_JOB.
 */
async function cancelBackups(client: BackupClient): Promise<Json> {
  const firstEvent = async (op: AsyncIterable<ProgressEvent>): Promise<ProgressEvent | undefined> => {
    for await (const event of op) {
      return event;
    }
    return undefined;
  };
  const controller = new AbortController();
  const aborted = client.create({ signal: controller.signal, cancelJobOnAbort: true });
  const abortedId = (await firstEvent(aborted))?.backup?.id ?? "";
  controller.abort();
  const abortedError = await failure(aborted);
  const afterAbort = await client.get(abortedId);
  const statusAfterAbort = await client.status();

  const other = client.create();
  const otherId = (await firstEvent(other))?.backup?.id ?? "";
  const cancelled = await client.cancel(otherId);
  const otherError = await failure(other);
  let otherIsJobCancelled = false;
  await other.catch((error: unknown) => {
    otherIsJobCancelled = isJobCancelled(error);
  });
  const afterCancel = await client.get(otherId);
  const nothing = await failure(client.cancel(otherId));
  return {
    abortedId,
    abortedError,
    afterAbort,
    currentJobAfterAbort: statusAfterAbort.currentJob ?? null,
    otherId,
    cancelled,
    otherError,
    otherIsJobCancelled,
    afterCancel,
    nothing,
  };
}

/** A restore stuck in the archive's SQL, aborted with cancelJobOnAbort once it is RESTORING: rolled back. */
async function cancelRestore(client: BackupClient, id: string): Promise<Json> {
  const controller = new AbortController();
  const phases: Phase[] = [];
  const error = await failure(
    client.restore(id, {
      skipSafetyBackup: true,
      signal: controller.signal,
      cancelJobOnAbort: true,
      onProgress: (event) => {
        phases.push(event.phase);
        if (event.phase === "RESTORING") {
          setTimeout(() => controller.abort(), 500); // once psql is in the archive's statements
        }
      },
    }),
  );
  const status = await client.status();
  return { phases, error, currentJob: status.currentJob ?? null };
}

async function create(client: BackupClient, format: string | undefined): Promise<Json> {
  const phases: Phase[] = [];
  const backup = await client.create({
    onProgress: (event) => phases.push(event.phase),
    ...(format === "custom" ? { format: "CUSTOM", compression: "NONE" } : {}),
  });
  return { backup, phases };
}

async function restore(client: BackupClient, id: string, flags: string[]): Promise<Json> {
  const events: ProgressEvent[] = [];
  try {
    const result = await client.restore(id, {
      skipSafetyBackup: flags.includes("--skip-safety-backup"),
      onProgress: (event) => events.push(event),
    });
    return { result, phases: events.map((event) => event.phase) };
  } catch (error) {
    return { error: describeError(error) };
  }
}

async function upload(client: BackupClient, path: string, flags: string[]): Promise<Json> {
  const phases: Phase[] = [];
  const restoreToo = flags.includes("--restore");
  const options = {
    restore: restoreToo,
    skipSafetyBackup: flags.includes("--skip-safety-backup"),
    onProgress: (event: ProgressEvent) => phases.push(event.phase),
  };
  // --stream: as the first-run wizard does with an upload it receives, a stream of known size.
  const source = flags.includes("--stream") ? createReadStream(path) : path;
  const op = client.uploadAndRestore(source, { ...options, sizeBytes: statSync(path).size });
  const result = await op;
  return { result, phases };
}

async function download(client: BackupClient, id: string, dest: string, flags: string[]): Promise<Json> {
  try {
    return { result: await client.download(id, dest, { resume: flags.includes("--resume") }) };
  } catch (error) {
    return { error: describeError(error) };
  }
}

/**
 * A read call, a write call, a download and an upload, each reporting its outcome: unary, server- and
 * bidirectional streams, for token and TLS checks.
 */
async function calls(client: BackupClient, work: string): Promise<Json> {
  const outcome = <T>(promise: PromiseLike<T>, ok: (value: T) => Json): Promise<Json> =>
    Promise.resolve(promise).then(
      (value) => ({ ok: true, ...ok(value) }),
      (error: unknown) => describeError(error),
    );
  const list = await outcome(client.list(), (backups) => ({ ids: backups.map((b) => b.id) }));
  const status = await outcome(client.status(), (s) => ({ databaseReachable: s.databaseReachable }));
  const created = await outcome(client.create(), (backup) => ({ id: backup.id }));
  const target = (list.ids as string[] | undefined)?.[0] ?? (created.id as string | undefined) ?? "none";
  const path = join(work, "calls.sql.gz");
  const download = await outcome(client.download(target, path), (result) => ({ sha256: result.backup.sha256 }));
  const upload = existsSync(path)
    ? await outcome(client.uploadAndRestore(path), (result) => ({ id: result.backup.id }))
    : { skipped: true };
  return { list, status, create: created, download, upload };
}

/** Verify (the newest backup, then one by id), Pin with and without expiry, Unpin, GFS retention. */
async function verifyAndPin(client: BackupClient, failingId: string): Promise<Json> {
  const phases: Phase[] = [];
  const newest = await client.verify("", { onProgress: (event) => phases.push(event.phase) });
  const failed = failingId === "" ? { skipped: true } : await failure(client.verify(failingId));
  const failedBackup = failingId === "" ? undefined : await client.get(failingId);
  const status = await client.status();
  const pinnedForever = await client.pin(newest.id);
  const pinnedForAnHour = await client.pin(newest.id, { ttlMs: 3_600_000 });
  const unpinned = await client.unpin(newest.id);
  const badPin = await failure(client.pin(newest.id, { ttlMs: -1000 }));
  const preview = await client.setRetention({ keepLast: 0, keepDaily: 1, validateOnly: true });
  return {
    newest,
    phases: [...new Set(phases)],
    failed,
    failedBackup: failedBackup ?? null,
    status: {
      lastVerifiedId: status.lastVerifiedBackup?.id ?? null,
      lastVerifiedResult: status.lastVerifiedBackup?.verifyResult ?? null,
      lastVerifySuccessTime: status.lastVerifySuccessTime?.toISOString() ?? null,
    },
    pinnedForever: { pinned: pinnedForever.pinned, expires: pinnedForever.pinExpireTime?.toISOString() ?? null },
    pinnedForAnHour: { pinned: pinnedForAnHour.pinned, expires: pinnedForAnHour.pinExpireTime?.toISOString() ?? null },
    unpinned: { pinned: unpinned.pinned, expires: unpinned.pinExpireTime?.toISOString() ?? null },
    badPin,
    preview,
  };
}

async function main(argv: string[]): Promise<Json> {
  const [command, address, ...args] = argv;
  if (command === undefined || address === undefined) {
    throw new Error("usage: node drive.js COMMAND ADDRESS [ARGS...]");
  }
  // The address is the command line's; token and TLS come from the same variables the CLI reads.
  const client = connect(address, connectionFromEnv().options);
  try {
    switch (command) {
      case "everything":
        return await everything(client, args[0] ?? ".", args[1] ?? "no-such-backup.sql.gz");
      case "status":
        return { status: await client.status() };
      case "cancel-backups":
        return await cancelBackups(client);
      case "cancel-restore":
        return await cancelRestore(client, args[0] ?? "");
      case "job-running":
        return await jobRunning(client, args[0] ?? "");
      case "create":
        return await create(client, args[0]);
      case "restore":
        return await restore(client, args[0] ?? "", args.slice(1));
      case "upload":
        return await upload(client, args[0] ?? "", args.slice(1));
      case "download":
        return await download(client, args[0] ?? "", args[1] ?? "", args.slice(2));
      case "verify-and-pin":
        return await verifyAndPin(client, args[0] ?? "");
      case "calls":
        return await calls(client, args[0] ?? ".");
      default:
        throw new Error(`unknown command ${command}`);
    }
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then(
  (result) => console.log(JSON.stringify(result, jsonReplacer)),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
