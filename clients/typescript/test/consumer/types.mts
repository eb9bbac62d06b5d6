// Type-checks against the packed declarations of the ES module entry point (tsc --noEmit).
import { type Backup, connect, isJobRunning, type Operation, type ProgressEvent } from "@aperture/backup-client";

const client = connect("127.0.0.1:50051", { token: "a-token-of-sixteen-chars", tls: { ca: "-----BEGIN CERTIFICATE-----" } });
const op: Operation<Backup> = client.create({ format: "CUSTOM", compression: "NONE" });
const size: bigint = (await op).sizeBytes;
const state: "CREATING" | "READY" | "FAILED" | "UNSPECIFIED" = (await op).state;
for await (const event of op) {
  const phase: ProgressEvent["phase"] = event.phase;
  void phase;
}
try {
  await client.restore("id", { signal: AbortSignal.timeout(1000) });
} catch (error) {
  if (isJobRunning(error)) {
    const reason: string = error.reason;
    void reason;
  }
}
void size;
void state;
