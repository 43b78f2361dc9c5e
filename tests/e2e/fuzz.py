"""Inputs for the fuzz test: random and hostile messages built from the proto descriptors,
mutated encodings and raw bytes.

Hand-written rather than hypothesis: the generator walks any message descriptor (and the
well-known types inside), and the run must be a fixed, seeded, time-bounded batch per RPC
against live processes, not a shrinking search.
"""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

F = FieldDescriptor

HOSTILE_STRINGS = [
    "",
    "a",
    "\x00",
    "name\x00tail",
    "trailing-newline\n",
    " ",
    "\u202e\u0645\u0631\u062d\u0628\u0627",
    "\U0001f600" * 3,
    "' OR 1=1 --",
    "'; DROP TABLE requests; --",
    "%s%s%n%x",
    "../../../../etc/passwd",
    "${jndi:ldap://127.0.0.1/a}",
    "{{7*7}}",
    "null",
    "-1",
    "9223372036854775808",
    "echo",
    "noop",
    "fail",
    "\r\n\r\nInjected: header",
    "a" * 65,
    "\t\v\f",
]
# Handler names that finish at once: the fuzz must leave nothing running for long, so
# `sleep` and `cpu` are never named on purpose.
QUICK_HANDLERS = ["echo", "noop", "fail"]

INT32 = [0, 1, -1, 2**31 - 1, -(2**31), 7]
UINT32 = [0, 1, 2, 100, 101, 2**32 - 1]
INT64 = [0, 1, -1, 2**63 - 1, -(2**63), 2**53 + 1]
UINT64 = [0, 1, 2, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
DOUBLES = [0.0, -0.0, -1.0, 1e-9, 0.5, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324]


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def string(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(HOSTILE_STRINGS)
        if r < 0.6:
            return str(uuid.uuid4()) + self.rng.choice(["", "\n", "\x00", " "])
        if r < 0.7:
            return self.rng.choice(QUICK_HANDLERS)
        if r < 0.8:
            return "".join(
                chr(self.rng.randrange(1, 0xD7FF)) for _ in range(self.rng.randrange(64))
            )
        return "x" * self.rng.choice([200, 201, 1024, 20_000, 100_000])

    def bytes_(self) -> bytes:
        size = self.rng.choice([0, 1, 8, 64, 1024, 70_000])
        return self.rng.randbytes(size)

    def scalar(self, field: FieldDescriptor) -> Any:
        t = field.type
        if t == F.TYPE_STRING:
            return self.string()
        if t == F.TYPE_BYTES:
            return self.bytes_()
        if t == F.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            value = self.rng.choice(DOUBLES)
            return (
                value
                if t == F.TYPE_DOUBLE or abs(value) < 3e38 or not math.isfinite(value)
                else 1.0
            )
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return self.rng.choice(INT32)
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return self.rng.choice(UINT32)
        if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            return self.rng.choice(INT64)
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return self.rng.choice(UINT64)
        if t == F.TYPE_ENUM:
            assert field.enum_type is not None
            values = [v.number for v in field.enum_type.values]
            # Open enums: unknown numbers go on the wire too.
            return self.rng.choice([*values, 99, -1])
        raise AssertionError(f"unhandled field type {t}")

    def message(self, descriptor: Descriptor, depth: int = 0) -> Message:
        cls = message_factory.GetMessageClass(descriptor)
        msg = cls()
        for field in descriptor.fields:
            if self.rng.random() < 0.35:
                continue
            count = self.rng.choice([1, 2, 5, 300]) if _repeated(field) else 1
            for _ in range(count):
                if field.type == F.TYPE_MESSAGE:
                    assert field.message_type is not None
                    if depth > 3:
                        break
                    value = self.message(field.message_type, depth + 1)
                    if _repeated(field):
                        getattr(msg, field.name).add().CopyFrom(value)
                    else:
                        getattr(msg, field.name).CopyFrom(value)
                elif _repeated(field):
                    getattr(msg, field.name).append(self.scalar(field))
                else:
                    setattr(msg, field.name, self.scalar(field))
        return msg

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data or b"\x0a\x00")
        for _ in range(self.rng.randrange(1, 4)):
            op = self.rng.randrange(5)
            pos = self.rng.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[pos % len(buf)] ^= 1 << self.rng.randrange(8)
            elif op == 1:
                del buf[pos : pos + self.rng.randrange(1, 8)]
            elif op == 2:
                buf[pos:pos] = self.rng.randbytes(self.rng.randrange(1, 8))
            elif op == 3:
                # A field tag with a wire type of 6 or 7 (invalid) or a huge length prefix.
                buf[pos:pos] = self.rng.choice([b"\x0f", b"\x0e", b"\x0a\xff\xff\xff\xff\x0f"])
            else:
                buf[pos:pos] = buf[: self.rng.randrange(1, 16)]
        return bytes(buf)

    def encoded(self, descriptor: Descriptor) -> tuple[str, bytes]:
        """One input: (kind, wire bytes)."""
        r = self.rng.random()
        if r < 0.45:
            return "random", self.message(descriptor).SerializeToString()
        if r < 0.85:
            return "mutated", self.mutate(self.message(descriptor).SerializeToString())
        return "bytes", self.rng.randbytes(self.rng.choice([1, 7, 64, 4096]))
