#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into corpus/<target>/.

The seeds are the valid examples of docs/protocol.md (every op with the
arguments it documents, the server API bodies, a cluster.toml, tokens in each
accepted algorithm), so fuzzing starts from inputs that reach past the first
parse. Files are named by their SHA-1, as libFuzzer names what it adds, so
running this again adds nothing twice. Needs only python3 and openssl (for
the RS256 and ES256 signatures, with the fixture keys in node/tests/fixtures).

    python3 tests/fuzz/seeds.py
"""

import base64
import hashlib
import hmac
import json
import pathlib
import struct
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURES = ROOT / "node" / "tests" / "fixtures"
DEV_SECRET = b"dev-secret-change-me"  # node/src/config.rs DEV_SECRET
EXP = 4102444800  # 2100-01-01: the seeds stay valid tokens

# The op names in the order of protocol/src/ops.rs OPS (op_args picks by index).
OPS = [
    "ping", "auth.refresh", "room.create", "room.direct", "room.join", "room.leave",
    "room.invite", "room.kick", "room.members", "rooms.list", "room.send", "room.edit",
    "room.delete", "history", "room.typing", "room.read", "subscribe", "unsubscribe",
    "topic.publish", "notifications.list", "notifications.unread", "notifications.read",
    "notifications.prefs.get", "notifications.prefs.set", "presence.set", "presence.watch",
    "presence.unwatch", "presence.query",
]

# docs/protocol.md "Requests": each op with the arguments it documents.
REQUESTS = [
    ("ping", None),
    ("ping", {}),
    ("auth.refresh", {"token": "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}),
    ("room.create", {"room": "team", "kind": "group", "name": "Team", "members": ["bob"]}),
    ("room.create", {"kind": "public"}),
    ("room.direct", {"user": "bob"}),
    ("room.join", {"room": "team"}),
    ("room.leave", {"room": "team"}),
    ("room.invite", {"room": "team", "user": "bob"}),
    ("room.kick", {"room": "team", "user": "bob"}),
    ("room.members", {"room": "team"}),
    ("rooms.list", {}),
    ("room.send", {"room": "team", "text": "hi"}),
    ("room.send", {"room": "team", "text": "hi @bob",
                   "attachments": {"files": [{"name": "a.png", "size": 1024}]},
                   "reply_to": 40, "client_id": "c-8812"}),
    ("room.edit", {"room": "team", "offset": 42, "text": "hello"}),
    ("room.delete", {"room": "team", "offset": 42}),
    ("history", {"channel": "room:team", "before": 40, "limit": 50}),
    ("history", {"channel": "topic:post:123", "after": 10}),
    ("room.typing", {"room": "team"}),
    ("room.read", {"room": "team", "offset": 42}),
    ("subscribe", {"channel": "room:team", "offset": 40, "epoch": "9f1c2a7e5b3d4c11"}),
    ("subscribe", {"channel": "feed:alice"}),
    ("unsubscribe", {"channel": "room:team"}),
    ("topic.publish", {"topic": "post:123", "data": {"likes": 12, "by": ["bob"], "ratio": 0.5},
                       "client_id": "c-1"}),
    ("notifications.list", {"before": 1838420111233024, "limit": 50, "unread_only": False}),
    ("notifications.unread", {}),
    ("notifications.read", {"ids": [1838420111233024]}),
    ("notifications.read", {"all": True}),
    ("notifications.prefs.get", {}),
    ("notifications.prefs.set", {"muted_categories": ["social"], "muted_rooms": ["team"]}),
    ("presence.set", {"status": "idle", "activity": "In a meeting"}),
    ("presence.watch", {"users": ["bob"], "room": "team"}),
    ("presence.unwatch", {"users": ["bob"]}),
    ("presence.query", {"users": ["bob", "carol"]}),
]

# docs/protocol.md "Server API": bodies and query strings.
API = [
    json.dumps({"room": "team", "kind": "group", "name": "Team", "created_by": "alice",
                "members": ["bob"]}),
    json.dumps({"kind": "direct", "created_by": "alice", "members": ["bob"]}),
    json.dumps({"user": "bob"}),
    json.dumps({"sender": "alice", "text": "hi", "attachments": {"a": [1]}, "reply_to": 3,
                "client_id": "c-1"}),
    json.dumps({"user": "alice", "type": "like", "title": "Bob liked your post",
                "priority": "normal"}),
    json.dumps({"users": ["alice", "bob"], "type": "mention", "title": "t", "body": "b",
                "data": {"post": 1}, "priority": "urgent", "category": "social",
                "room": "team", "ttl_ms": 60000}),
    json.dumps({"data": {"count": 3}, "client_id": "c-2"}),
    json.dumps({"users": ["alice", "bob"], "data": {"post": 9}}),
    "before=40&after=10&limit=50",
    "before=1838420111233024&limit=20&unread_only=true",
]


def msgpack(v):
    """The MessagePack encoding rmp-serde writes for a JSON document (maps with names)."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if 0 <= v < 2**32:
            return b"\xce" + struct.pack(">I", v)
        if 0 <= v:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        return b"\xd9" + bytes([len(b)]) + b if len(b) < 256 else b"\xda" + struct.pack(">H", len(b)) + b
    if isinstance(v, list):
        assert len(v) < 16
        return bytes([0x90 | len(v)]) + b"".join(msgpack(x) for x in v)
    if isinstance(v, dict):
        assert len(v) < 16
        return bytes([0x80 | len(v)]) + b"".join(msgpack(k) + msgpack(x) for k, x in v.items())
    raise TypeError(v)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def der_to_raw(der):
    """An ECDSA DER signature (SEQUENCE of r, s) as JWS wants it: r || s, 32 bytes each."""
    assert der[0] == 0x30
    i = 2
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        out += der[i + 2:i + 2 + n].lstrip(b"\x00").rjust(32, b"\x00")
        i += 2 + n
    return out


def token(alg, claims):
    signing_input = f"{b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    if alg == "HS256":
        sig = hmac.new(DEV_SECRET, signing_input.encode(), hashlib.sha256).digest()
    else:
        key = FIXTURES / ("rs256.key.pem" if alg == "RS256" else "es256.pk8.pem")
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)],
                             input=signing_input.encode(), capture_output=True, check=True).stdout
        if alg == "ES256":
            sig = der_to_raw(sig)
    return f"{signing_input}.{b64(sig)}"


def write(target, data):
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main():
    for i, (op, args) in enumerate(REQUESTS, start=1):
        env = {"id": i, "op": op}
        if args is not None:
            env["args"] = args
        write("frame_json", json.dumps(env).encode())
        write("frame_msgpack", msgpack(env))
        write("op_args", bytes([OPS.index(op), 0]) + json.dumps(args).encode())
        write("op_args", bytes([OPS.index(op), 1]) + msgpack(args))
    write("frame_json", b'{"id":1,"op":"ping"}')

    claims = {"sub": "alice", "exp": EXP, "iat": 1700000000, "rooms": ["team-*", "lobby"],
              "topics": ["post:*"], "publish": ["post:*"]}
    for alg in ["HS256", "RS256", "ES256"]:
        write("jwt", b"\x00" + token(alg, claims).encode())
    write("jwt", b"\x00" + token("HS256", {"sub": "bob", "exp": EXP}).encode())
    header = json.dumps({"alg": "HS256", "typ": "JWT"})
    write("jwt", b"\x01" + f"{header}\n{json.dumps(claims)}".encode())
    write("jwt", b"\x01" + f'{header}\n{{"sub":"bob","exp":{EXP}}}'.encode())

    for body in API:
        write("api_bodies", body.encode())

    names = {name: i for i, name in enumerate([
        # node/src/config.rs ENV_OVERRIDES, in order (config picks by index).
        "CHORUS_NODE_ID", "CHORUS_NODE_LISTEN", "CHORUS_AUTH_JWT_SECRET",
        "CHORUS_AUTH_JWT_PUBLIC_KEY_FILE", "CHORUS_AUTH_JWT_ALGORITHMS", "CHORUS_AUTH_API_KEY",
        "CHORUS_STORAGE_BACKEND", "CHORUS_STORAGE_EMBEDDED_PATH",
        "CHORUS_STORAGE_SCYLLA_CONTACT_POINTS", "CHORUS_STORAGE_SCYLLA_KEYSPACE",
        "CHORUS_STORAGE_SCYLLA_USERNAME", "CHORUS_STORAGE_SCYLLA_PASSWORD", "CHORUS_LOG_LEVEL",
    ])}
    toml = (ROOT / "cluster.toml").read_bytes()
    write("config", toml)
    env = [("CHORUS_NODE_LISTEN", "127.0.0.1:0"), ("CHORUS_AUTH_API_KEY", "a-long-api-key"),
           ("CHORUS_STORAGE_BACKEND", "scylla"),
           ("CHORUS_STORAGE_SCYLLA_CONTACT_POINTS", "127.0.0.1:9042, 127.0.0.2:9042"),
           ("CHORUS_AUTH_JWT_ALGORITHMS", "HS256,RS256"),
           ("CHORUS_AUTH_JWT_PUBLIC_KEY_FILE", "/etc/chorus/jwt.pem")]
    write("config", toml + b"\x00" + b"\n".join(bytes([names[k]]) + v.encode() for k, v in env))
    write("config", b'version = 1\n[node]\nlisten = "0.0.0.0:7600"\n[limits]\nmax_frame_bytes = 1024\n')


if __name__ == "__main__":
    main()
