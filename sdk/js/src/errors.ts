/** Error codes of docs/protocol.md, by name. */
export const ErrorCode = {
  malformed_frame: 1001,
  unknown_op: 1002,
  invalid_args: 1003,
  frame_too_large: 1004,
  rate_limited: 1005,
  wrong_encoding: 1006,
  invalid_value: 1007,
  token_missing: 2001,
  token_malformed: 2002,
  token_bad_signature: 2003,
  token_expired: 2004,
  token_algorithm: 2005,
  token_missing_claim: 2006,
  token_user_mismatch: 2007,
  api_key_invalid: 2008,
  forbidden: 3001,
  room_not_found: 3002,
  not_member: 3003,
  room_exists: 3004,
  message_not_found: 3005,
  not_author: 3006,
  bad_channel: 3007,
  wrong_room_kind: 3008,
  not_subscribed: 3009,
  notification_not_found: 3010,
  internal: 5001,
  store_unavailable: 5002,
  conflict: 5003,
  overloaded: 5004,
  shutting_down: 5005,
} as const;

/**
 * Errors raised by the SDK itself, never sent by a server. They use the 9xxx
 * range so that `code` alone tells them apart from the protocol's codes.
 */
export const ClientErrorCode = {
  /** No reply within the request's timeout (a queued request waited too long). */
  timeout: 9001,
  /** The offline queue is full (`queue.max`). */
  queue_full: 9002,
  /** The connection dropped while the request was in flight and it is not safe to resend. */
  connection_lost: 9003,
  /** `close()` was called. */
  closed: 9004,
  /** Not connected and the offline queue is disabled. */
  not_connected: 9005,
  /** The server refused the WebSocket handshake (HTTP 401) and there is no `getToken` to get another token. */
  handshake_refused: 9006,
  /** The server spoke something else than the protocol (a wrong subprotocol, an undecodable frame). */
  protocol_error: 9007,
  /** `getToken()` threw or returned no token. */
  token_unavailable: 9008,
  /** `reconnect.maxAttempts` consecutive attempts failed. */
  reconnect_failed: 9009,
} as const;

export type ErrorName = keyof typeof ErrorCode | keyof typeof ClientErrorCode;

const RETRYABLE_CLIENT = new Set<number>([
  ClientErrorCode.timeout,
  ClientErrorCode.queue_full,
  ClientErrorCode.connection_lost,
  ClientErrorCode.not_connected,
  ClientErrorCode.token_unavailable,
]);

const NAMES = new Map<number, string>();
for (const [n, c] of Object.entries(ErrorCode)) NAMES.set(c, n);
for (const [n, c] of Object.entries(ClientErrorCode)) NAMES.set(c, n);

/** The body of an error reply. */
export interface ErrorBody {
  code: number;
  name: string;
  message: string;
  retryable: boolean;
}

/**
 * Every failure the SDK reports: a server error reply (`code` 1xxx-5xxx, as in
 * docs/protocol.md) or a client-side one (9xxx, see `ClientErrorCode`).
 * `name` is the code's stable snake_case name (`not_member`).
 */
export class ChorusError extends Error {
  readonly code: number;
  override readonly name: string;
  readonly retryable: boolean;
  /** The op that failed, when the error answers a request. */
  readonly op?: string;
  /** The `client_id` of a failed `room.send` / `topic.publish`: retry with it to store the message once. */
  readonly clientId?: string;

  constructor(
    body: { code: number; name?: string; message: string; retryable?: boolean },
    extra: { op?: string; clientId?: string; cause?: unknown } = {},
  ) {
    super(body.message, extra.cause !== undefined ? { cause: extra.cause } : undefined);
    this.code = body.code;
    this.name = body.name ?? NAMES.get(body.code) ?? "unknown";
    this.retryable =
      body.retryable ?? (RETRYABLE_CLIENT.has(body.code) || (body.code >= 5000 && body.code < 6000) || body.code === 1005);
    if (extra.op !== undefined) this.op = extra.op;
    if (extra.clientId !== undefined) this.clientId = extra.clientId;
  }

  /** A client-side error by name. */
  static client(name: keyof typeof ClientErrorCode, message: string, extra: { op?: string; clientId?: string; cause?: unknown } = {}): ChorusError {
    return new ChorusError({ code: ClientErrorCode[name], name, message }, extra);
  }

  override toString(): string {
    return `ChorusError ${this.code} ${this.name}: ${this.message}`;
  }
}

export function isChorusError(e: unknown, name?: ErrorName): e is ChorusError {
  return e instanceof ChorusError && (name === undefined || e.name === name);
}
