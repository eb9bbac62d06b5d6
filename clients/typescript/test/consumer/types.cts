// Type-checks against the packed declarations of the CommonJS entry point (tsc --noEmit).
import { BackupServiceError, connect, isNotFound } from "@aperture/backup-client";

async function main(): Promise<void> {
  const client = connect("127.0.0.1:50051");
  const backups = await client.list({ pageSize: 10 });
  const first: bigint | undefined = backups[0]?.sizeBytes;
  try {
    await client.download("id", "saved.sql.gz", { resume: true });
  } catch (error) {
    if (isNotFound(error) || error instanceof BackupServiceError) {
      const code: string = error.codeName;
      void code;
    }
  }
  void first;
}
void main;
