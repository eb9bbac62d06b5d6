/**
 * The real service the package's tests run against: `APERTURE_BACKUP_ADDRESS` when the caller (the
 * project's pytest) passes one, else `aperture-backup serve` started here on a free loopback port, with a
 * temporary backup directory and the embedded PostgreSQL it starts when no database URL is given.
 *
 * The command is `APERTURE_BACKUP_BIN`, else the project's `.venv/bin/aperture-backup` (what `make test`
 * installs), else `aperture-backup` on PATH.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

import { connect, connectionFromEnv } from "../src/index";

export interface TestService {
  address: string;
  /** Stops the service if it was started here (and removes its directory). */
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  await once(server, "close");
  if (address === null || typeof address === "string") {
    throw new Error("could not find a free port");
  }
  return address.port;
}

function serviceCommand(): string {
  if (process.env.APERTURE_BACKUP_BIN) {
    return process.env.APERTURE_BACKUP_BIN;
  }
  // build/test/ → the package → clients/ → the project.
  const venv = resolve(__dirname, "..", "..", "..", "..", ".venv", "bin", "aperture-backup");
  return existsSync(venv) ? venv : "aperture-backup";
}

export async function startService(): Promise<TestService> {
  if (process.env.APERTURE_BACKUP_ADDRESS) {
    return { address: process.env.APERTURE_BACKUP_ADDRESS, stop: async () => undefined };
  }
  const port = await freePort();
  const directory = mkdtempSync(join(tmpdir(), "aperture-backup-npm-test-"));
  const address = `127.0.0.1:${port}`;
  const output: Buffer[] = [];
  const child: ChildProcess = spawn(serviceCommand(), ["serve"], {
    env: {
      ...process.env,
      APERTURE_BACKUP_LISTEN: address,
      APERTURE_BACKUP_DIR: join(directory, "backups"),
      APERTURE_BACKUP_SCHEDULE: "off",
      APERTURE_BACKUP_CATCH_UP: "false",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout?.on("data", (data: Buffer) => output.push(data));
  child.stderr?.on("data", (data: Buffer) => output.push(data));
  // Rejects when the command cannot be started at all (events.once rejects on 'error').
  const exited = once(child, "exit").catch((error: unknown) => {
    throw new Error(`could not start ${serviceCommand()}: ${String(error)}`);
  });

  const stop = async (): Promise<void> => {
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      await exited.catch(() => undefined);
    }
    rmSync(directory, { recursive: true, force: true });
  };

  const client = connect(address, connectionFromEnv().options);
  const deadline = Date.now() + 90_000;
  try {
    for (;;) {
      const outcome = await Promise.race([
        client.status({ timeoutMs: 2000 }).then(() => "up" as const, () => "not yet" as const),
        exited.then(() => "exited" as const),
      ]);
      if (outcome === "up") {
        return { address, stop };
      }
      if (outcome === "exited" || Date.now() > deadline) {
        throw new Error(`the service did not come up on ${address}:\n${Buffer.concat(output).toString()}`);
      }
      await new Promise((done) => setTimeout(done, 250));
    }
  } catch (error) {
    await stop();
    throw error;
  } finally {
    client.close();
  }
}
