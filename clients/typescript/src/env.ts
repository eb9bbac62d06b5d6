/**
 * The connection from the environment, with the variables the service's own CLI reads, so one set of
 * settings (a compose file, a Kubernetes secret) serves the Aperture backend and an administrator alike.
 *
 *   APERTURE_BACKUP_ADDRESS          host:port (default 127.0.0.1:50051)
 *   APERTURE_BACKUP_TOKEN            bearer token, or APERTURE_BACKUP_TOKEN_FILE naming a file holding it
 *   APERTURE_BACKUP_CA_CERT          PEM file of the CA that signed the service's certificate (TLS)
 *   APERTURE_BACKUP_CLIENT_CERT      PEM client certificate and APERTURE_BACKUP_CLIENT_KEY its key (mutual TLS)
 *   APERTURE_BACKUP_TLS_SERVER_NAME  the name the service's certificate carries, when not the address's host
 */
import { readFileSync } from "node:fs";

import { BackupClient } from "./client";
import type { ConnectOptions, TlsOptions } from "./connection";

export const DEFAULT_ADDRESS = "127.0.0.1:50051";
const PREFIX = "APERTURE_BACKUP_";

function read(env: NodeJS.ProcessEnv, name: string): Buffer | undefined {
  const path = env[PREFIX + name]?.trim();
  if (!path) {
    return undefined;
  }
  try {
    return readFileSync(path);
  } catch (error) {
    throw new TypeError(`${PREFIX}${name} names ${path}, which cannot be read: ${(error as Error).message}`);
  }
}

/** The address and connect options the environment describes; TLS when a certificate is named. */
export function connectionFromEnv(env: NodeJS.ProcessEnv = process.env): { address: string; options: ConnectOptions } {
  const options: ConnectOptions = {};
  const token = env[`${PREFIX}TOKEN`] || undefined;
  const tokenFile = read(env, "TOKEN_FILE");
  if (token !== undefined && tokenFile !== undefined) {
    throw new TypeError(`both ${PREFIX}TOKEN and ${PREFIX}TOKEN_FILE are set; set only one`);
  }
  const fromFile = tokenFile?.toString("utf8").replace(/\r?\n$/, "");
  if (tokenFile !== undefined && !fromFile) {
    throw new TypeError(`${PREFIX}TOKEN_FILE names an empty file`);
  }
  if (token ?? fromFile) {
    options.token = token ?? fromFile;
  }
  const tls: TlsOptions = {};
  const ca = read(env, "CA_CERT");
  const cert = read(env, "CLIENT_CERT");
  const key = read(env, "CLIENT_KEY");
  const serverName = env[`${PREFIX}TLS_SERVER_NAME`]?.trim();
  if (ca !== undefined) tls.ca = ca;
  if (cert !== undefined) tls.cert = cert;
  if (key !== undefined) tls.key = key;
  if (serverName) tls.serverName = serverName;
  if (Object.keys(tls).length > 0) {
    options.tls = tls;
  }
  return { address: env[`${PREFIX}ADDRESS`]?.trim() || DEFAULT_ADDRESS, options };
}

/** A client configured by the environment (see `connectionFromEnv`), with `overrides` on top. */
export function connectFromEnv(env: NodeJS.ProcessEnv = process.env, overrides: ConnectOptions = {}): BackupClient {
  const { address, options } = connectionFromEnv(env);
  return new BackupClient(address, { ...options, ...overrides });
}
