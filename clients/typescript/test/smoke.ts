/**
 * Drives a running aperture-backup through the package, as the Aperture backend would, and prints what it
 * saw as one JSON object (tests/test_typescript_client.py asserts on it).
 *
 * Usage: node smoke.js HOST:PORT MISSING_ID
 */
import { createHash } from "node:crypto";
import { Writable } from "node:stream";

import {
  BackupFormat,
  backupStateToJSON,
  Compression,
  connect,
  errorInfo,
  isNotFound,
  isServiceError,
  phaseToJSON,
} from "../src/index";

/** A Writable that keeps what it gets, slowly enough (setImmediate) that back-pressure is exercised. */
class Collect extends Writable {
  readonly chunks: Buffer[] = [];

  constructor() {
    super({ highWaterMark: 16 * 1024 });
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, done: (error?: Error | null) => void): void {
    this.chunks.push(chunk);
    setImmediate(done);
  }

  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

async function main(target: string, missingId: string): Promise<Record<string, unknown>> {
  const client = connect(target);
  try {
    const phases: string[] = [];
    const plain = await client.create({}, (progress) => phases.push(phaseToJSON(progress.phase)));
    const custom = await client.create({ format: BackupFormat.BACKUP_FORMAT_CUSTOM, compression: Compression.COMPRESSION_NONE });

    // pageSize 1 makes list() follow a page token.
    const listed = await client.list(1);

    const whole = new Collect();
    const download = await client.download(plain.backup.id, whole, { chunkSize: 4096 });
    const half = Math.floor(whole.bytes().length / 2);
    const rest = new Collect();
    const resumed = await client.download(plain.backup.id, rest, { offset: half, chunkSize: 4096 });
    const joined = Buffer.concat([whole.bytes().subarray(0, half), rest.bytes()]);

    const status = await client.status();

    let notFound: Record<string, unknown> = { raised: false };
    try {
      await client.get(missingId);
    } catch (error) {
      if (!isServiceError(error)) {
        throw error;
      }
      const info = errorInfo(error);
      notFound = {
        raised: true,
        code: error.code,
        isNotFound: isNotFound(error),
        details: error.details,
        reason: info?.reason ?? null,
        domain: info?.domain ?? null,
      };
    }

    return {
      created: {
        id: plain.backup.id,
        state: backupStateToJSON(plain.backup.state),
        sizeBytes: plain.backup.sizeBytes,
        sha256: plain.backup.sha256,
        createTimeIsDate: plain.backup.createTime instanceof Date,
        phases,
      },
      custom: { id: custom.backup.id, state: backupStateToJSON(custom.backup.state) },
      listed: listed.map((backup) => backup.id),
      download: {
        bytesWritten: download.bytesWritten,
        sha256Verified: download.sha256Verified,
        sha256: createHash("sha256").update(whole.bytes()).digest("hex"),
        resumedBytesWritten: resumed.bytesWritten,
        resumedSha256Verified: resumed.sha256Verified,
        resumedSha256: createHash("sha256").update(joined).digest("hex"),
      },
      status: {
        lastSuccessfulId: status.lastSuccessfulBackup?.id ?? null,
        database: status.database,
        databaseReachable: status.databaseReachable,
        currentJob: status.currentJob ?? null,
      },
      notFound,
    };
  } finally {
    client.close();
  }
}

const [target, missingId] = process.argv.slice(2);
if (target === undefined || missingId === undefined) {
  console.error("usage: node smoke.js HOST:PORT MISSING_ID");
  process.exit(2);
}
main(target, missingId).then(
  (result) => console.log(JSON.stringify(result)),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
