import { decode as mpDecode, encode as mpEncode } from "@msgpack/msgpack";

export type Encoding = "json" | "msgpack";

export const SUBPROTOCOL: Record<Encoding, string> = {
  json: "chorus.v1.json",
  msgpack: "chorus.v1.msgpack",
};

export interface Codec {
  readonly encoding: Encoding;
  encode(value: unknown): string | Uint8Array;
  decode(data: unknown): unknown;
}

const textDecoder = new TextDecoder();

function toBytes(data: unknown): Uint8Array | undefined {
  if (data instanceof Uint8Array) return data; // includes Node's Buffer
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) {
    // `ws` with binaryType "fragments"
    const parts = data.map((d) => toBytes(d) ?? new Uint8Array());
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
  return undefined;
}

export const jsonCodec: Codec = {
  encoding: "json",
  encode: (value) => JSON.stringify(value),
  decode(data) {
    if (typeof data === "string") return JSON.parse(data);
    const bytes = toBytes(data);
    if (bytes) throw new Error("binary frame on a JSON connection");
    throw new Error("unreadable frame");
  },
};

export const msgpackCodec: Codec = {
  encoding: "msgpack",
  // Absent optional fields are left out, never sent as nil (the server reads
  // nil as a value, which is wrong for fields like `unread_only`).
  encode: (value) => mpEncode(value, { ignoreUndefined: true }),
  decode(data) {
    const bytes = toBytes(data);
    if (bytes) return mpDecode(bytes);
    if (typeof data === "string") throw new Error("text frame on a MessagePack connection");
    throw new Error("unreadable frame");
  },
};

export function codecFor(e: Encoding): Codec {
  return e === "msgpack" ? msgpackCodec : jsonCodec;
}

/** Decodes a JWT's payload without verifying it (for `exp` and `sub`). */
export function jwtClaims(token: string): { sub?: string; exp?: number } | undefined {
  const part = token.split(".")[1];
  if (!part) return undefined;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const claims = JSON.parse(textDecoder.decode(bytes));
    return typeof claims === "object" && claims !== null ? claims : undefined;
  } catch {
    return undefined;
  }
}
