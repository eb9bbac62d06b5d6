/**
 * `npm test`: the client against a real aperture-backup (test/service.ts starts one, or uses
 * APERTURE_BACKUP_ADDRESS). The tests run in order and share the service; each leaves its settings as it
 * found them.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createReadStream, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { after, before, describe, it } from "node:test";

import {
  AbortError,
  type Backup,
  type BackupClient,
  BackupServiceError,
  ChecksumMismatchError,
  connect,
  connectionFromEnv,
  GrpcStatus,
  isAbortError,
  isInvalidArgument,
  isJobRunning,
  isNotFound,
  isUnavailable,
  jsonReplacer,
  type Phase,
  PARTIAL_SUFFIX,
} from "../src/index";
import { startService, type TestService } from "./service";

const MISSING = "aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz";

const sha256 = (data: Buffer): string => createHash("sha256").update(data).digest("hex");

describe("aperture-backup client", { concurrency: false }, () => {
  let service: TestService;
  let client: BackupClient;
  let work: string;
  let backup: Backup;

  before(async () => {
    service = await startService();
    // A token and TLS, when the environment names them (the same variables as the service's CLI).
    client = connect(service.address, connectionFromEnv().options);
    work = mkdtempSync(join(tmpdir(), "aperture-backup-client-test-"));
  });

  after(async () => {
    client?.close();
    rmSync(work, { recursive: true, force: true });
    await service?.stop();
  });

  it("creates a backup, with progress as a callback", async () => {
    const phases: Phase[] = [];
    backup = await client.create({ onProgress: (event) => phases.push(event.phase) });
    assert.equal(backup.state, "READY");
    assert.equal(backup.format, "PLAIN");
    assert.equal(backup.compression, "GZIP");
    assert.equal(backup.trigger, "MANUAL");
    assert.equal(typeof backup.sizeBytes, "bigint");
    assert.ok(backup.sizeBytes > 0n);
    assert.match(backup.sha256, /^[0-9a-f]{64}$/);
    assert.ok(backup.createTime instanceof Date);
    assert.deepEqual([phases[0], phases.at(-1)], ["PREPARING", "DONE"]);
    assert.ok(phases.includes("DUMPING"));
  });

  it("creates a custom-format backup, with progress as an async iterator", async () => {
    const op = client.create({ format: "CUSTOM", compression: "NONE" });
    const seen: Phase[] = [];
    for await (const event of op) {
      seen.push(event.phase);
      assert.equal(event.backup?.format, "CUSTOM");
    }
    const custom = await op;
    assert.equal(seen.at(-1), "DONE");
    assert.equal(custom.state, "READY");
    assert.match(custom.id, /\.dump$/);
    assert.deepEqual(await client.get(custom.id), custom);
    const deleted = await client.delete(custom.id);
    assert.equal(deleted.id, custom.id);
    await assert.rejects(client.get(custom.id), isNotFound);
  });

  it("replays the latest event to an iterator made late, and throws a failed operation's error", async () => {
    const op = client.restore(MISSING);
    const late = client.create();
    const made = await late;
    const phases: Phase[] = [];
    for await (const event of late) {
      phases.push(event.phase);
    }
    assert.deepEqual(phases, ["DONE"]);
    assert.equal(late.latest?.backup?.id, made.id);
    await assert.rejects(
      (async () => {
        for await (const _ of op) {
          /* a restore of an unknown id sends no progress */
        }
      })(),
      isNotFound,
    );
    await assert.rejects(op, isNotFound);
    await client.delete(made.id);
  });

  it("lists backups newest first, following page tokens, and gets one", async () => {
    const listed = await client.list({ pageSize: 1 });
    assert.ok(listed.some((b) => b.id === backup.id));
    const page = await client.listPage({ pageSize: 1 });
    assert.equal(page.backups.length, 1);
    const sorted = [...listed].sort((a, b) => (b.createTime?.getTime() ?? 0) - (a.createTime?.getTime() ?? 0));
    assert.deepEqual(listed.map((b) => b.id), sorted.map((b) => b.id));
    assert.deepEqual(await client.get(backup.id), backup);
    // bigint sizes survive JSON for a browser with the replacer.
    assert.equal(JSON.parse(JSON.stringify(backup, jsonReplacer)).sizeBytes, backup.sizeBytes.toString());
  });

  it("tells the status", async () => {
    const status = await client.status();
    assert.equal(status.databaseReachable, true);
    assert.ok(status.database.length > 0);
    assert.equal(status.currentJob, undefined);
    assert.equal(status.interruptedJob, undefined);
    assert.ok(status.lastSuccessfulBackup !== undefined);
    assert.ok((status.lastSuccessfulAgeMs ?? -1) >= 0);
    assert.equal(status.offsite, undefined, "no bucket is configured");
    assert.deepEqual(status.lastSuccessfulBackup?.locations, ["LOCAL"]);
    assert.equal(status.lastSuccessfulBackup?.encrypted, false);
  });

  it("lists the job history newest first, following page tokens", async () => {
    const jobs = await client.listJobs({ pageSize: 1 });
    assert.ok(jobs.length >= 2);
    assert.deepEqual(
      jobs.map((j) => j.id),
      [...jobs.map((j) => j.id)].sort().reverse(),
    );
    const made = jobs.find((j) => j.kind === "BACKUP" && j.backupId === backup.id);
    assert.ok(made !== undefined);
    assert.equal(made.outcome, "SUCCEEDED");
    assert.equal(made.trigger, "MANUAL");
    assert.ok(made.startTime instanceof Date);
    assert.ok(made.durationMs > 0);
    assert.match(made.callerAddress, /:\d+$/);
    const page = await client.listJobsPage({ pageSize: 1 });
    assert.equal(page.jobs.length, 1);
    assert.notEqual(page.nextPageToken, "");
    assert.deepEqual(page.jobs[0], jobs[0]);
    const status = await client.status();
    assert.equal(status.stale, false);
    assert.equal(status.staleAfterMs, 26 * 3600 * 1000);
  });

  it("gets and sets retention", async () => {
    const before = await client.getRetention();
    const changed = await client.setRetention({ keepLast: 100, keepDaily: 7, keepMonthly: 12 });
    assert.deepEqual(changed, { keepLast: 100, keepDaily: 7, keepWeekly: 0, keepMonthly: 12, deletedIds: [] });
    assert.deepEqual(await client.getRetention(), { keepLast: 100, keepDaily: 7, keepWeekly: 0, keepMonthly: 12 });
    await assert.rejects(client.setRetention({ keepLast: 0 }), (error: unknown) => {
      assert.ok(isInvalidArgument(error));
      assert.equal(error.reason, "INVALID_RETENTION");
      return true;
    });
    await client.setRetention(before);
  });

  it("verifies a backup and pins it", async () => {
    const phases: Phase[] = [];
    const verified = await client.verify(backup.id, { onProgress: (event) => phases.push(event.phase) });
    assert.equal(verified.verifyResult, "PASSED");
    assert.equal(verified.verifyFailedCheck, "");
    assert.ok(verified.verifyTime instanceof Date);
    assert.ok(phases.includes("RESTORING") && phases.includes("CHECKING"));
    assert.ok(Object.values(verified.tableRows).every((rows) => typeof rows === "bigint"));
    assert.equal((await client.status()).lastVerifiedBackup?.id, backup.id);
    const pinned = await client.pin(backup.id, { ttlMs: 3_600_000 });
    assert.equal(pinned.pinned, true);
    assert.ok(pinned.pinExpireTime !== undefined && pinned.pinExpireTime.getTime() > Date.now());
    const unpinned = await client.unpin(backup.id);
    assert.equal(unpinned.pinned, false);
    assert.equal(unpinned.pinExpireTime, undefined);
  });

  it("gets and sets the schedule", async () => {
    const before = await client.getSchedule();
    const on = await client.setSchedule({ enabled: true, timeOfDay: "04:15", timeZone: "Europe/Berlin" });
    assert.equal(on.enabled, true);
    assert.equal(on.timeOfDay, "04:15");
    assert.equal(on.timeZone, "Europe/Berlin");
    assert.ok(on.nextRunTime instanceof Date && on.nextRunTime.getTime() > Date.now());
    await assert.rejects(client.setSchedule({ timeZone: "Mars/Olympus" }), (error: unknown) => {
      assert.ok(error instanceof BackupServiceError);
      assert.equal(error.codeName, "INVALID_ARGUMENT");
      assert.equal(error.reason, "INVALID_SCHEDULE");
      return true;
    });
    const restored = await client.setSchedule({
      enabled: before.enabled,
      timeOfDay: before.timeOfDay,
      timeZone: before.timeZone,
      catchUp: before.catchUp,
    });
    assert.deepEqual({ ...restored, nextRunTime: undefined }, { ...before, nextRunTime: undefined });
  });

  it("downloads into a file, checked, and resumes a broken download", async () => {
    const dest = join(work, backup.filename);
    const result = await client.download(backup.id, dest, { chunkSize: 1024 });
    const data = readFileSync(dest);
    assert.equal(sha256(data), backup.sha256);
    assert.equal(BigInt(data.length), backup.sizeBytes);
    assert.equal(result.sha256Verified, true);
    assert.equal(existsSync(dest + PARTIAL_SUFFIX), false);

    const resumed = join(work, "resumed.sql.gz");
    writeFileSync(resumed + PARTIAL_SUFFIX, data.subarray(0, 100));
    const progress: bigint[] = [];
    const again = await client.download(backup.id, resumed, {
      resume: true,
      chunkSize: 1024,
      onProgress: (p) => progress.push(p.bytesDone),
    });
    assert.equal(again.resumedFrom, 100n);
    assert.equal(again.bytesWritten, backup.sizeBytes - 100n);
    assert.equal(progress.at(-1), backup.sizeBytes);
    assert.deepEqual(readFileSync(resumed), data);
  });

  it("leaves no file when a download fails its checksum or the backup does not exist", async () => {
    // A part that does not belong to the archive: the whole is hashed and refused.
    const dest = join(work, "wrong.sql.gz");
    writeFileSync(dest + PARTIAL_SUFFIX, Buffer.alloc(10, 7));
    await assert.rejects(client.download(backup.id, dest, { resume: true }), ChecksumMismatchError);
    assert.equal(existsSync(dest), false);
    assert.equal(existsSync(dest + PARTIAL_SUFFIX), false);

    // A part longer than the archive is not a piece of it: discarded, and the download starts over.
    const long = join(work, "long.sql.gz");
    writeFileSync(long + PARTIAL_SUFFIX, Buffer.alloc(Number(backup.sizeBytes) + 5));
    const fresh = await client.download(backup.id, long, { resume: true });
    assert.equal(fresh.resumedFrom, 0n);
    assert.equal(sha256(readFileSync(long)), backup.sha256);

    const missing = join(work, "missing.sql.gz");
    await assert.rejects(client.download(MISSING, missing), (error: unknown) => {
      assert.ok(isNotFound(error));
      assert.equal(error.code, GrpcStatus.NOT_FOUND);
      assert.equal(error.reason, "BACKUP_NOT_FOUND");
      assert.equal(error.domain, "backup.aperture.dev");
      assert.ok(error.details.includes(MISSING));
      return true;
    });
    assert.equal(existsSync(missing), false);
    assert.equal(existsSync(missing + PARTIAL_SUFFIX), false);
  });

  it("uploads a file and a stream, and restores an upload", async () => {
    const path = join(work, backup.filename);
    const stored = await client.uploadAndRestore(path);
    assert.equal(stored.backup.trigger, "UPLOADED");
    assert.equal(stored.backup.sha256, backup.sha256);
    assert.equal(stored.restore, undefined);

    const op = client.uploadAndRestore(createReadStream(path, { highWaterMark: 333 }), {
      sizeBytes: statSync(path).size,
      filename: "wizard.sql.gz",
      restore: true,
      skipSafetyBackup: true,
      chunkSize: 4096,
    });
    const phases: Phase[] = [];
    for await (const event of op) {
      phases.push(event.phase);
    }
    const restored = await op;
    assert.ok(phases.includes("UPLOADING") && phases.includes("RESTORING"));
    assert.equal(restored.restore?.restored.id, restored.backup.id);
    assert.equal(restored.restore?.reconnectRequired, true);
    assert.equal(restored.restore?.safetyBackup, undefined);

    // A stream of unknown size (a browser's upload relayed as it comes): spooled, then sent and checked.
    const pieces = [readFileSync(path).subarray(0, 10), readFileSync(path).subarray(10)];
    const spooled = await client.uploadAndRestore(Readable.from(pieces), { spoolDirectory: work });
    assert.equal(spooled.backup.sha256, backup.sha256);
    assert.deepEqual(readdirSync(work).filter((name) => name.startsWith("aperture-backup-upload-")), []);

    await client.delete(stored.backup.id);
    await client.delete(restored.backup.id);
    await client.delete(spooled.backup.id);
  });

  it("restores a stored backup, with a safety backup first", async () => {
    const op = client.restore(backup.id);
    const phases: Phase[] = [];
    for await (const event of op) {
      phases.push(event.phase);
    }
    const result = await op;
    assert.ok(phases.includes("SAFETY_BACKUP") && phases.includes("RESTORING"));
    assert.equal(result.restored.id, backup.id);
    assert.equal(result.safetyBackup?.trigger, "PRE_RESTORE");
    assert.equal(result.notifyChannel, "aperture_backup_restored");
    assert.ok(result.durationMs > 0);
    if (result.safetyBackup !== undefined) {
      await client.delete(result.safetyBackup.id);
    }
    await assert.rejects(client.restore(MISSING), isNotFound);
    // Nothing runs now: Cancel says so.
    await assert.rejects(client.cancel(backup.id), (error: unknown) => {
      assert.ok(error instanceof BackupServiceError);
      assert.equal(error.codeName, "FAILED_PRECONDITION");
      assert.equal(error.reason, "NO_JOB");
      return true;
    });
  });

  it("cancels with an AbortSignal", async () => {
    await assert.rejects(client.list({ signal: AbortSignal.abort() }), AbortError);
    await assert.rejects(client.restore(backup.id, { signal: AbortSignal.abort() }), isAbortError);

    const controller = new AbortController();
    const dest = join(work, "aborted.sql.gz");
    await assert.rejects(
      client.download(backup.id, dest, { chunkSize: 16, signal: controller.signal, onProgress: () => controller.abort() }),
      (error: unknown) => isAbortError(error),
    );
    assert.equal(existsSync(dest), false);
    assert.ok(statSync(dest + PARTIAL_SUFFIX).size > 0);
    const done = await client.download(backup.id, dest, { resume: true });
    assert.ok(done.resumedFrom > 0n);
    assert.equal(sha256(readFileSync(dest)), backup.sha256);
  });

  it("rejects with the error a progress callback throws", async () => {
    const oops = new Error("the admin page went away");
    const path = join(work, backup.filename);
    await assert.rejects(
      client.uploadAndRestore(path, {
        onProgress: () => {
          throw oops;
        },
      }),
      (error: unknown) => error === oops,
    );
  });

  it("refuses a second job while one runs (JOB_RUNNING) or says the service is busy", async () => {
    // Two creates at once: the second either finds the first running or runs after it has finished.
    const first = client.create();
    await new Promise<void>((resolve) => {
      void (async () => {
        for await (const _ of first) {
          resolve();
          break;
        }
      })();
    });
    const second = await client.create().then(
      (b) => b,
      (error: unknown) => error,
    );
    const firstBackup = await first;
    if (second instanceof Error) {
      assert.ok(isJobRunning(second), String(second));
      assert.ok(second.details.includes(firstBackup.id));
    } else {
      assert.equal((second as Backup).state, "READY");
    }
  });

  it("reports an unreachable service as UNAVAILABLE and bad arguments as TypeError", async () => {
    await client.waitForReady({ timeoutMs: 5000 });
    const nowhere = connect("127.0.0.1:1");
    try {
      await assert.rejects(nowhere.waitForReady({ timeoutMs: 300 }), isUnavailable);
      await assert.rejects(nowhere.list({ timeoutMs: 3000 }), (error: unknown) => isUnavailable(error) || String(error).includes("DEADLINE"));
    } finally {
      nowhere.close();
    }
    assert.throws(() => client.create({ format: "TAR" as "PLAIN" }), TypeError);
    assert.throws(() => connect("127.0.0.1:1", { tls: { ca: "/etc/ssl/ca.pem" } }), TypeError);
    assert.throws(() => connect("127.0.0.1:1", { token: "two\nlines" }), TypeError);
  });

  it("reads its connection from the variables the service's CLI reads", () => {
    const tokenFile = join(work, "token");
    writeFileSync(tokenFile, "a-token-from-a-secret-file\n");
    const { address, options } = connectionFromEnv({ APERTURE_BACKUP_ADDRESS: "backup:50051", APERTURE_BACKUP_TOKEN_FILE: tokenFile });
    assert.equal(address, "backup:50051");
    assert.deepEqual(options, { token: "a-token-from-a-secret-file" });
    assert.equal(connectionFromEnv({}).address, "127.0.0.1:50051");
    assert.throws(() => connectionFromEnv({ APERTURE_BACKUP_TOKEN: "x", APERTURE_BACKUP_TOKEN_FILE: tokenFile }), TypeError);
    assert.throws(() => connectionFromEnv({ APERTURE_BACKUP_CA_CERT: join(work, "no-such.pem") }), TypeError);
  });
});
