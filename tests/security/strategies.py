"""Hypothesis strategies for hostile client input, shared by the fuzz tests: edge-case
strings and numbers, arbitrary JSON values, deep nesting spliced in as raw text, one-field
mutations of a plausible object, and a JSON serializer that lets NaN, Infinity and raw
lone surrogates (invalid UTF-8) through, as a broken client library would."""

from __future__ import annotations

import json
import secrets
from typing import Any

from hypothesis import strategies as st

# Field names that dictionary keys are drawn from (so that nested objects look real).
KEYS = ["id", "type", "room_id", "client_msg_id", "body", "seq", "token", "resume",
        "username", "password", "kind", "name", "members", "user_id", "role"]

EDGE_STRINGS = ["", " ", "\x00", "\x7f", "\ud800", "\udfff", "\ud83d", "a\udc00b", "\ufeff",
                "\u202e", "\u200b", "\uffff", "\ufffe", "\U0010ffff", "e\u0301", "\u00df",
                "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\\", '"', "</script>",
                "%s%n%x", "{{7*7}}", "${jndi:x}", "null", "NaN", "1e309", "\r\n", "\t" * 9,
                "{0}", "*", "?", "[", "..", "../../etc/passwd", "x" * 64, "x" * 65,
                "\u0130", "\u212a"]
BIG_NUMBERS = [0, -1, 1, 2**31, 2**53, 2**53 + 1, -(2**53) - 1, 2**63, 2**64, 10**30,
               -(10**30), 10**400, 1e308, -1e308, 5e-324, -0.0, 0.5, float("nan"),
               float("inf"), float("-inf")]


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight (`st.one_of` weighs
    its branches alike and merges repeated ones)."""
    index = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(index).flatmap(lambda i: choices[i][1])


def big_strings() -> st.SearchStrategy[str]:
    return st.builds(lambda unit, n: unit * n,
                     st.sampled_from(["x", "\u00e9", "\U0001f600", "\ud800", "{", "\\", "\x00"]),
                     st.sampled_from([100, 3999, 4000, 4001, 10000, 16000, 40000]))


def strings() -> st.SearchStrategy[str]:
    return weighted((2, st.sampled_from(EDGE_STRINGS)), (2, st.text(max_size=40)),
                    (1, big_strings()))


def numbers() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(BIG_NUMBERS), st.integers(),
                     st.floats(allow_nan=True, allow_infinity=True))


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), numbers(), strings())


def json_values() -> st.SearchStrategy[Any]:
    return st.recursive(scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner,
                        max_size=4)), max_leaves=8)


def deep(opener: str, closer: str, middle: str = "") -> st.SearchStrategy[str]:
    return st.builds(lambda d: opener * d + middle + closer * d,
                     st.sampled_from([2, 64, 600, 3000, 10000, 30000, 70000]))


def deep_values() -> st.SearchStrategy[Any]:
    """Deeply nested JSON text, spliced raw into a frame (not parsed on our side)."""
    return st.one_of(deep("[", "]"), deep('{"a":', "}", "1"), deep("[{\"x\":", "}]", "0"))


RAW = "\x00raw:"  # marks a deep-nesting value spliced into the JSON text as is


def hostile() -> st.SearchStrategy[Any]:
    """Any value a broken or hostile client may put in a field."""
    return st.one_of(json_values(), strings(), numbers(),
                     deep_values().map(lambda t: RAW + t))


def mutated(frame: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The frame as is, or with one field replaced by a hostile value, or removed, or with
    an unknown field added."""
    keys = sorted(frame)
    return weighted(
        (3, st.just(frame)),
        (3, st.builds(lambda k, v: {**frame, k: v}, st.sampled_from(keys), hostile())),
        (1, st.builds(lambda k: {f: v for f, v in frame.items() if f != k},
                      st.sampled_from(keys))),
        (1, st.builds(lambda k, v: {**frame, k: v}, st.text(max_size=8), json_values())))


def serialize(frame: dict[str, Any], ascii_only: bool) -> bytes:
    """JSON text as a client library might send it: NaN/Infinity tokens allowed; lone
    surrogates escaped (ascii_only) or raw, which makes the bytes invalid UTF-8."""
    spliced = {}
    for key, value in frame.items():
        if isinstance(value, str) and value.startswith(RAW):
            token = f"@@{secrets.token_hex(6)}@@"
            spliced[json.dumps(token)] = value[len(RAW):]
            frame = {**frame, key: token}
    text = json.dumps(frame, ensure_ascii=ascii_only, allow_nan=True)
    for quoted, raw in spliced.items():
        text = text.replace(quoted, raw)
    return text.encode("utf-8", "surrogatepass")


def nesting(payload: bytes) -> int:
    """How deeply the JSON text nests arrays and objects (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest
