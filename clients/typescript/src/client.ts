// ToolchainClient: one method per RPC of toolchain.v1.ToolchainService over gRPC (HTTP/2),
// plaintext, TLS or mTLS, with an optional bearer token.

import { readFileSync } from "node:fs";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { createClient, type CallOptions, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import {
  ToolchainService,
  type CancelStageResponse,
  type RunSynthesisResponse,
  type RunToolsResponse,
  type StageRequestSchema,
  type Tool,
} from "./gen/toolchain/v1/toolchain_pb.js";
import { withToolchainErrors } from "./errors.js";
import { Health, ServingStatus } from "./health.js";
import { StageStream } from "./stream.js";

/** A StageRequest as a plain object: `{ userPrompt: "What is 6*7?", toolPhase: { temperature: 0 } }`. */
export type StageInit = MessageInitShape<typeof StageRequestSchema>;

/** TLS settings. PEM contents (`ca`, `cert`, `key`) win over the files naming them. */
export interface TlsOptions {
  /** PEM file of the CA that signed the server's certificate (default: the system's roots). */
  caFile?: string;
  /** PEM file of the client certificate, for mTLS (with `keyFile`). */
  certFile?: string;
  /** PEM file of the client certificate's private key, for mTLS. */
  keyFile?: string;
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name to verify the server's certificate against (default: the address's host). */
  serverName?: string;
}

export interface ToolchainClientOptions {
  /** "host:port" (e.g. "127.0.0.1:50051"), or a URL "http://host:port" / "https://host:port". */
  address: string;
  /** Bearer token, sent as `authorization: Bearer <token>` on every call. */
  token?: string | undefined;
  /** TLS: true for the system's roots, or TlsOptions (CA file, client cert + key for mTLS). Default: plaintext, unless the address is an https URL. */
  tls?: boolean | TlsOptions | undefined;
  /** Deadline of every call without its own `timeoutMs`, in milliseconds. Default: none. */
  timeoutMs?: number | undefined;
  /** More interceptors, run after the token's. */
  interceptors?: Interceptor[] | undefined;
}

/** Call options of a stream: a signal that cancels it, a deadline, headers. */
export type StreamCallOptions = Pick<CallOptions, "signal" | "timeoutMs" | "headers" | "onHeader" | "onTrailer">;

function baseUrl(address: string, tls: boolean): string {
  if (/^https?:\/\//i.test(address)) return address;
  return `${tls ? "https" : "http"}://${address}`;
}

function tlsNodeOptions(tls: true | TlsOptions): Record<string, unknown> {
  if (tls === true) return {};
  const read = (inline: string | Buffer | undefined, file: string | undefined) =>
    inline ?? (file === undefined ? undefined : readFileSync(file));
  const options: Record<string, unknown> = {};
  const ca = read(tls.ca, tls.caFile);
  const cert = read(tls.cert, tls.certFile);
  const key = read(tls.key, tls.keyFile);
  if ((cert === undefined) !== (key === undefined)) {
    throw new Error("TLS: a client certificate needs its key, and a key its certificate");
  }
  if (ca !== undefined) options["ca"] = ca;
  if (cert !== undefined) options["cert"] = cert;
  if (key !== undefined) options["key"] = key;
  if (tls.serverName !== undefined) options["servername"] = tls.serverName;
  return options;
}

/** A bearer token interceptor. */
export function bearerToken(token: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

/**
 * The client of toolchain.v1.ToolchainService. Each instance has its own HTTP/2 connection
 * (opened on the first call); `close()` closes it. Failures are thrown as ToolchainError;
 * streams are StageStreams (see stream.ts).
 */
export class ToolchainClient {
  /** The generated connect client, for what the wrapper does not cover. */
  readonly raw: Client<typeof ToolchainService>;
  readonly #health: Client<typeof Health>;
  readonly #session: Http2SessionManager;

  constructor(options: ToolchainClientOptions) {
    const secure = options.tls !== undefined && options.tls !== false;
    const url = baseUrl(options.address, secure);
    const nodeOptions = secure ? tlsNodeOptions(options.tls as true | TlsOptions) : {};
    this.#session = new Http2SessionManager(url, {}, nodeOptions);
    const interceptors = [...(options.token ? [bearerToken(options.token)] : []), ...(options.interceptors ?? [])];
    const transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: this.#session,
      interceptors,
      ...(options.timeoutMs !== undefined ? { defaultTimeoutMs: options.timeoutMs } : {}),
    });
    this.raw = createClient(ToolchainService, transport);
    this.#health = createClient(Health, transport);
  }

  /** RunTools: the tool phase only. */
  runTools(stage: StageInit, options?: CallOptions): Promise<RunToolsResponse> {
    return withToolchainErrors(() => this.raw.runTools({ stage }, options));
  }

  /** RunSynthesis: the tool phase, then the synthesis phase. */
  runSynthesis(stage: StageInit, options?: CallOptions): Promise<RunSynthesisResponse> {
    return withToolchainErrors(() => this.raw.runSynthesis({ stage }, options));
  }

  /** StreamTools, read through the invariant checks. The call starts now. */
  streamTools(stage: StageInit, options?: StreamCallOptions): StageStream {
    return new StageStream(
      "tools",
      (signal) => this.raw.streamTools({ stage }, { ...options, signal }),
      options?.signal,
    );
  }

  /** StreamSynthesis, read through the invariant checks. The call starts now. */
  streamSynthesis(stage: StageInit, options?: StreamCallOptions): StageStream {
    return new StageStream(
      "synthesis",
      (signal) => this.raw.streamSynthesis({ stage }, { ...options, signal }),
      options?.signal,
    );
  }

  /** CancelStage: cancel a running stage by its id, from any connection. */
  cancelStage(stageId: string, options?: CallOptions): Promise<CancelStageResponse> {
    return withToolchainErrors(() => this.raw.cancelStage({ stageId }, options));
  }

  /** ListTools: the server's tools, sorted by name. */
  async listTools(options?: CallOptions): Promise<Tool[]> {
    const response = await withToolchainErrors(() => this.raw.listTools({}, options));
    return response.tools;
  }

  /** grpc.health.v1.Health/Check of `service` ("" is the whole server). */
  async checkHealth(service = "", options?: CallOptions): Promise<ServingStatus> {
    const response = await withToolchainErrors(() => this.#health.check({ service }, options));
    return response.status;
  }

  /** Close the connection; calls still running fail with CANCELLED. */
  close(): void {
    this.#session.abort();
  }
}

/** A ToolchainClient for `options`. */
export function createToolchainClient(options: ToolchainClientOptions): ToolchainClient {
  return new ToolchainClient(options);
}
