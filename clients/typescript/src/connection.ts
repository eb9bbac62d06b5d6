/**
 * The channel and what goes with every call: credentials (plaintext, TLS, mutual TLS), the bearer token as
 * per-call metadata, deadlines, and AbortSignal wiring.
 *
 * The token travels as `authorization: Bearer <token>` metadata on each call rather than as grpc-js call
 * credentials, which grpc-js refuses to send over a plaintext channel: loopback without TLS is a
 * supported setup (the service and the Aperture backend in one pod or compose network).
 */
import {
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ClientOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";

import { abortError, toClientError } from "./errors";

/** PEM contents (not file names) for a TLS connection; read them with `fs.readFileSync(path)`. */
export interface TlsOptions {
  /** CA certificate(s) that signed the service's certificate; the system's roots when unset. */
  ca?: string | Buffer;
  /** Client certificate chain, for a service that requires client certificates (mutual TLS). */
  cert?: string | Buffer;
  /** The client certificate's private key; required with `cert`. */
  key?: string | Buffer;
  /** The name to check the service's certificate against when it differs from the address's host. */
  serverName?: string;
}

export interface ConnectOptions {
  /** Bearer token sent on every call (`authorization: Bearer <token>`): the admin or read-only token. */
  token?: string;
  /** TLS: `true` for the system's roots, or the PEM material. Plaintext when unset or false. */
  tls?: boolean | TlsOptions;
  /** Channel credentials made by the caller; take the place of `tls`. */
  credentials?: ChannelCredentials;
  /** grpc-js channel options, merged over this client's (8 MiB message limits). */
  channelOptions?: Partial<ClientOptions>;
  /** A deadline for every unary call (List, Get, ...) that does not set its own, in milliseconds. */
  defaultTimeoutMs?: number;
}

/** Settings of one call. */
export interface CallOptions {
  /** Cancels the call; the promise rejects with an AbortError. */
  signal?: AbortSignal;
  /** Fails the call with DEADLINE_EXCEEDED after this many milliseconds. */
  timeoutMs?: number;
  /** Fails the call with DEADLINE_EXCEEDED at this time. */
  deadline?: Date;
  /** Extra metadata for this call. */
  metadata?: Metadata | Record<string, string>;
}

/** Download chunks are at most 4 MiB; the limits leave room for the message around them. */
export const MAX_MESSAGE_BYTES = 8 * 1024 * 1024;

const PEM = /-----BEGIN [A-Z0-9 ]+-----/;

function pem(value: string | Buffer | undefined, what: string): Buffer | null {
  if (value === undefined) {
    return null;
  }
  const buffer = typeof value === "string" ? Buffer.from(value) : value;
  if (!PEM.test(buffer.toString("latin1"))) {
    throw new TypeError(
      `tls.${what} must be PEM contents ("-----BEGIN ..."), not a file name; pass fs.readFileSync(path)`,
    );
  }
  return buffer;
}

/** The channel credentials and extra channel options `options` ask for. */
export function channelCredentials(options: ConnectOptions): {
  credentials: ChannelCredentials;
  channelOptions: Partial<ClientOptions>;
} {
  if (options.credentials !== undefined) {
    return { credentials: options.credentials, channelOptions: {} };
  }
  const tls = options.tls;
  if (tls === undefined || tls === false) {
    return { credentials: grpcCredentials.createInsecure(), channelOptions: {} };
  }
  const settings: TlsOptions = tls === true ? {} : tls;
  const cert = pem(settings.cert, "cert");
  const key = pem(settings.key, "key");
  if ((cert === null) !== (key === null)) {
    throw new TypeError("tls.cert and tls.key go together: give both for mutual TLS, or neither");
  }
  const channelOptions: Partial<ClientOptions> =
    settings.serverName === undefined
      ? {}
      : { "grpc.ssl_target_name_override": settings.serverName, "grpc.default_authority": settings.serverName };
  return { credentials: grpcCredentials.createSsl(pem(settings.ca, "ca"), key, cert), channelOptions };
}

/** What every call of one client shares: the token and the default deadline. */
export class CallContext {
  readonly #authorization: string | undefined;
  readonly #defaultTimeoutMs: number | undefined;

  constructor(options: ConnectOptions) {
    if (options.token !== undefined) {
      if (options.token === "" || /[\r\n]/.test(options.token)) {
        throw new TypeError("token must be a non-empty string without line breaks");
      }
      this.#authorization = `Bearer ${options.token}`;
    }
    this.#defaultTimeoutMs = options.defaultTimeoutMs;
  }

  /** The metadata of one call: the caller's, then the token. */
  metadata(options: CallOptions | undefined): Metadata {
    const metadata = new Metadata();
    const extra = options?.metadata;
    if (extra instanceof Metadata) {
      metadata.merge(extra);
    } else if (extra !== undefined) {
      for (const [key, value] of Object.entries(extra)) {
        metadata.set(key, value);
      }
    }
    if (this.#authorization !== undefined) {
      metadata.set("authorization", this.#authorization);
    }
    return metadata;
  }

  /** grpc-js call options: the deadline (a streaming call gets none unless the caller sets one). */
  callOptions(options: CallOptions | undefined, unary: boolean): Partial<GrpcCallOptions> {
    if (options?.deadline !== undefined) {
      return { deadline: options.deadline };
    }
    const timeout = options?.timeoutMs ?? (unary ? this.#defaultTimeoutMs : undefined);
    return timeout === undefined ? {} : { deadline: Date.now() + timeout };
  }
}

/** Throws an AbortError when `signal` is already aborted: no call is made then. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    throw abortError(signal);
  }
}

/** Cancels `call` when `signal` aborts; returns the function that stops listening. */
export function cancelOnAbort(call: { cancel(): void }, signal: AbortSignal | undefined): () => void {
  if (signal === undefined) {
    return () => undefined;
  }
  const cancel = (): void => call.cancel();
  signal.addEventListener("abort", cancel, { once: true });
  return () => signal.removeEventListener("abort", cancel);
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** One unary call as a promise, cancelled by `options.signal`, rejecting with the client's error types. */
export function unary<Req, Res>(
  context: CallContext,
  method: UnaryMethod<Req, Res>,
  request: Req,
  options: CallOptions | undefined,
): Promise<Res> {
  const signal = options?.signal;
  return new Promise<Res>((resolve, reject) => {
    throwIfAborted(signal);
    let stop = (): void => undefined;
    const call = method(request, context.metadata(options), context.callOptions(options, true), (error, response) => {
      stop();
      if (error === null) {
        resolve(response);
      } else {
        reject(toClientError(error, signal));
      }
    });
    stop = cancelOnAbort(call, signal);
  });
}

/**
 * The messages of a server stream, as an async iterable that cancels the call when the consumer stops
 * early or `signal` aborts, and throws the client's error types.
 */
export async function* serverStream<T>(call: ClientReadableStream<T>, signal: AbortSignal | undefined): AsyncGenerator<T> {
  const stop = cancelOnAbort(call, signal);
  // grpc-js emits the CANCELLED status as an 'error' event even after the consumer has stopped reading;
  // without a listener that event would crash the process. The iterator below sees errors on its own.
  call.on("error", () => undefined);
  let finished = false;
  try {
    // Readable's own iterator yields `any`; the generated client's stream carries T.
    const messages: AsyncIterable<T> = call;
    for await (const message of messages) {
      // Messages already buffered would still come after the cancel: stop at once instead.
      throwIfAborted(signal);
      yield message;
    }
    finished = true;
  } catch (error) {
    throw toClientError(error, signal);
  } finally {
    stop();
    if (!finished) {
      call.cancel();
    }
  }
}
