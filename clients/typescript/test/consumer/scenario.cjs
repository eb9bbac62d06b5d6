// What a program that installed the packed package does with it, in plain JavaScript: every operation
// against a real service. consumer.mjs runs it through `import`, consumer.cjs through `require`; each
// prints what it saw as JSON for tests/test_typescript_client.py.
"use strict";
const { createHash } = require("node:crypto");
const { createReadStream, readFileSync, statSync } = require("node:fs");
const { join } = require("node:path");

const sha256 = (path) => createHash("sha256").update(readFileSync(path)).digest("hex");

module.exports = async function scenario(api, address, work) {
  const client = api.connect(address, { token: process.env.APERTURE_BACKUP_TOKEN });
  try {
    const phases = [];
    const backup = await client.create({ onProgress: (event) => phases.push(event.phase) });
    const listed = await client.list();
    const got = await client.get(backup.id);
    const status = await client.status();

    const retention = await client.getRetention();
    const retentionSet = await client.setRetention({ keepLast: retention.keepLast });
    const schedule = await client.getSchedule();
    const scheduleSet = await client.setSchedule({ timeOfDay: "02:45" });
    await client.setSchedule({ timeOfDay: schedule.timeOfDay });

    const path = join(work, backup.filename);
    const download = await client.download(backup.id, path);

    const uploadPhases = [];
    const upload = await client.uploadAndRestore(createReadStream(path), {
      sizeBytes: statSync(path).size,
      restore: true,
      skipSafetyBackup: true,
      onProgress: (event) => uploadPhases.push(event.phase),
    });
    const restoreOp = client.restore(backup.id, { skipSafetyBackup: true });
    const restorePhases = [];
    for await (const event of restoreOp) restorePhases.push(event.phase);
    const restored = await restoreOp;
    const deleted = await client.delete(upload.backup.id);

    let notFound = null;
    try {
      await client.get(upload.backup.id);
    } catch (error) {
      notFound = {
        isNotFound: api.isNotFound(error),
        isBackupServiceError: error instanceof api.BackupServiceError,
        codeName: error.codeName,
        reason: error.reason,
      };
    }
    // Cancel with nothing running: refused with a reason (a real cancel is tested in the project's tests).
    const noJob = await client.cancel(backup.id).then(
      () => ({ refused: false }),
      (error) => ({ refused: true, codeName: error.codeName, reason: error.reason }),
    );
    let aborted = null;
    try {
      await client.list({ signal: AbortSignal.abort() });
    } catch (error) {
      aborted = { name: error.name, isAbortError: api.isAbortError(error) };
    }

    return JSON.stringify(
      {
        backup,
        phases,
        listed: listed.map((b) => b.id),
        sameAsGet: JSON.stringify(got, api.jsonReplacer) === JSON.stringify(backup, api.jsonReplacer),
        sizeIsBigint: typeof backup.sizeBytes === "bigint",
        status: { lastSuccessfulId: status.lastSuccessfulBackup && status.lastSuccessfulBackup.id, databaseReachable: status.databaseReachable },
        retention: { keepLast: retention.keepLast, set: retentionSet },
        schedule: { set: scheduleSet.timeOfDay },
        download: { sha256Verified: download.sha256Verified, sha256: sha256(path), bytes: download.bytesWritten },
        upload: { trigger: upload.backup.trigger, restoredId: upload.restore.restored.id, phases: uploadPhases },
        restore: { restoredId: restored.restored.id, reconnectRequired: restored.reconnectRequired, phases: restorePhases },
        deleted: deleted.id,
        notFound,
        noJob,
        aborted,
      },
      api.jsonReplacer,
    );
  } finally {
    client.close();
  }
};
