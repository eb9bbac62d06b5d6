/**
 * Measures this Node process's resident memory while it moves a large archive through a running service:
 * an upload from a stream generated on the fly (no file, nothing kept), the download of it into a file,
 * and an upload from that file. Prints one JSON object; RSS in MiB, sampled every 10 ms.
 *
 * Usage: node memory.js ADDRESS SIZE_MB WORK_DIR   (token and TLS from the APERTURE_BACKUP_* variables)
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { rm } from "node:fs/promises";
import { join } from "node:path";

import { type BackupClient, connect, connectionFromEnv, jsonReplacer } from "../src/index";

const MiB = 1024 * 1024;

/**
 * A plain-SQL archive (the service recognises it by its leading comment) of exactly `size` bytes, made
 * as it is read: every piece is a new buffer, so anything that held on to pieces would show in the RSS.
 */
async function* generated(size: number, hash: ReturnType<typeof createHash>): AsyncGenerator<Buffer> {
  const line = Buffer.from("-- aperture-backup memory check: filler that a restore would read as a comment\n");
  let sent = 0;
  let counter = 0;
  while (sent < size) {
    const piece = Buffer.allocUnsafe(Math.min(MiB, size - sent));
    for (let at = 0; at < piece.length; at += line.length) {
      line.copy(piece, at, 0, Math.min(line.length, piece.length - at));
    }
    piece.writeUInt32BE(counter++ >>> 0, Math.max(0, Math.min(40, piece.length - 4))); // no two pieces alike
    hash.update(piece);
    sent += piece.length;
    yield piece;
  }
}

interface Sample {
  peakMiB: number;
  seconds: number;
  mibPerSecond: number;
}

async function measure(size: number, run: () => Promise<unknown>): Promise<Sample> {
  let peak = process.memoryUsage.rss();
  const timer = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage.rss());
  }, 10);
  const started = process.hrtime.bigint();
  try {
    await run();
  } finally {
    clearInterval(timer);
  }
  peak = Math.max(peak, process.memoryUsage.rss());
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  return { peakMiB: Math.round(peak / MiB), seconds: Math.round(seconds * 100) / 100, mibPerSecond: Math.round(size / MiB / seconds) };
}

async function main(client: BackupClient, size: number, work: string): Promise<Record<string, unknown>> {
  await client.list(); // the channel and grpc-js warmed up before the baseline
  const baselineMiB = Math.round(process.memoryUsage.rss() / MiB);

  const hash = createHash("sha256");
  let uploadedId = "";
  const uploadStream = await measure(size, async () => {
    const result = await client.uploadAndRestore(generated(size, hash), { sizeBytes: size, filename: "generated.sql" });
    uploadedId = result.backup.id;
  });
  const generatedSha256 = hash.digest("hex");

  const path = join(work, "downloaded.sql");
  let downloadedSha256 = "";
  const download = await measure(size, async () => {
    const result = await client.download(uploadedId, path);
    downloadedSha256 = result.backup.sha256;
  });
  const fileHash = createHash("sha256");
  for await (const piece of createReadStream(path) as AsyncIterable<Buffer>) {
    fileHash.update(piece);
  }

  let fileUploadId = "";
  const uploadFile = await measure(size, async () => {
    fileUploadId = (await client.uploadAndRestore(path)).backup.id;
  });

  await client.delete(uploadedId);
  await client.delete(fileUploadId);
  await rm(path, { force: true });
  return {
    sizeMiB: Math.round(size / MiB),
    baselineMiB,
    uploadStream,
    download,
    uploadFile,
    checksums: {
      generated: generatedSha256,
      service: downloadedSha256,
      downloadedFile: fileHash.digest("hex"),
    },
    node: process.version,
  };
}

const [address, sizeMb, work] = process.argv.slice(2);
if (address === undefined || sizeMb === undefined || work === undefined) {
  console.error("usage: node memory.js ADDRESS SIZE_MB WORK_DIR");
  process.exit(2);
}
const client = connect(address, connectionFromEnv().options);
main(client, Number(sizeMb) * MiB, work)
  .then(
    (result) => console.log(JSON.stringify(result, jsonReplacer)),
    (error: unknown) => {
      console.error(error);
      process.exitCode = 1;
    },
  )
  .finally(() => client.close());
