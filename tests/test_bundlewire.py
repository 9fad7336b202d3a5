"""The agent's pydantic-free reader (``ringfence.bundlewire``) against the pydantic models
(``ringfence.bundle``): same fields, same accept/refuse verdicts, same canonical bytes.

The fuzz below mutates signed golden documents (structure and raw text), re-signs some of them so
they reach the acceptance rules, and runs both readers through parse → verify → accept.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ringfence import bundle
from ringfence import bundlewire as wire
from tests.conftest import GOLDEN

BUNDLES = sorted(GOLDEN.glob("bundle-*.json"))
DELTAS = sorted(GOLDEN.glob("delta-*.json"))
PUBLIC = GOLDEN / "test-key.pub.pem"
KEY = bundle.SigningKey.from_file(GOLDEN / "test-key.pem")
VERIFY_PYD = bundle.Verifier.from_file(PUBLIC)
VERIFY_WIRE = wire.Verifier.from_file(PUBLIC)

PAIRS = [
    (wire.Signature, bundle.Signature),
    (wire.ServiceMatch, bundle.ServiceMatch),
    (wire.BundleRule, bundle.BundleRule),
    (wire.AddressSetDoc, bundle.AddressSetDoc),
    (wire.FailsafeDoc, bundle.FailsafeDoc),
    (wire.Bundle, bundle.Bundle),
    (wire.SetDelta, bundle.SetDelta),
]


@pytest.mark.parametrize(("lean", "model"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_same_fields_required_fields_and_defaults(lean: Any, model: Any) -> None:
    """A field added to the pydantic model (the JSON Schema) must be added to the agent's reader."""
    ours = {f.name: f for f in dataclasses.fields(lean)}
    theirs = model.model_fields
    assert list(ours) == list(theirs)
    for name, info in theirs.items():
        f = ours[name]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default == (not info.is_required()), name
        if has_default:
            ours_default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            default = info.get_default(call_default_factory=True)
            dump = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
            assert _json(ours_default) == dump, name


def _json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


@pytest.mark.parametrize("path", [*BUNDLES, *DELTAS], ids=lambda p: p.name)
def test_golden_files_read_identically(path: Path) -> None:
    raw = path.read_bytes()
    is_bundle = path.name.startswith("bundle-")
    model = bundle.load_bundle(raw) if is_bundle else bundle.load_delta(raw)
    lean = wire.load_bundle(raw) if is_bundle else wire.load_delta(raw)
    assert lean == bundle.to_wire(model)  # type: ignore[call-overload]
    assert wire.canonical_bytes(lean) == bundle.canonical_bytes(model)
    assert wire.dumps(lean) == bundle.dumps(model) == raw.decode()  # the golden bytes, exactly
    VERIFY_WIRE.verify(lean)
    if isinstance(lean, wire.Bundle):
        assert isinstance(model, bundle.Bundle)
        assert lean.content() == model.content()


def test_key_reading_matches_cryptography() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = PUBLIC.read_bytes()
    public = serialization.load_pem_public_key(pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert wire.ed25519_public_from_pem(pem) == raw
    assert wire.Verifier.from_pem(pem).key_id == bundle.key_id_of(public) == KEY.key_id  # type: ignore[arg-type]
    assert wire.ed25519_public_from_pem(b"junk\n" + pem.replace(b"\n", b"\r\n") + b"trailer") == raw
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for bad in (rsa_pem, KEY.private_pem(), b"", pem.replace(b"M", b"*", 1), pem[:60] + pem[64:]):
        with pytest.raises(bundle.BundleError, match="Ed25519 public key"):
            wire.Verifier.from_pem(bad)


# --- both readers through parse → verify → accept ----------------------------------------------------


def pyd_outcome(text: str | bytes, kind: str, applied: bundle.Bundle | None) -> tuple[Any, ...]:
    try:
        doc: bundle.Bundle | bundle.SetDelta = bundle.load_bundle(text) if kind == "bundle" else bundle.load_delta(text)
    except bundle.BundleError:
        return ("refused: malformed",)
    try:
        VERIFY_PYD.verify(doc)
        if isinstance(doc, bundle.Bundle) and applied is not None:
            bundle.check_acceptable(doc, applied.workload_id, applied.version, applied)
    except bundle.BundleError as exc:
        return ("refused", str(exc), bundle.canonical_bytes(doc))
    return ("accepted", bundle.canonical_bytes(doc), bundle.dumps(doc))


def wire_outcome(text: str | bytes, kind: str, applied: wire.Bundle | None) -> tuple[Any, ...]:
    try:
        doc: wire.Bundle | wire.SetDelta = wire.load_bundle(text) if kind == "bundle" else wire.load_delta(text)
    except wire.BundleError:
        return ("refused: malformed",)
    try:
        VERIFY_WIRE.verify(doc)
        if isinstance(doc, wire.Bundle) and applied is not None:
            wire.check_acceptable(doc, applied.workload_id, applied.version, applied)
    except wire.BundleError as exc:
        return ("refused", str(exc), wire.canonical_bytes(doc))
    return ("accepted", wire.canonical_bytes(doc), wire.dumps(doc))


# values a mutation puts in place of a field: every JSON type, near-miss literals, boundaries
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**64,
    10**40,
    1.0,
    0.5,
    "",
    "x",
    "1",
    "enforce",
    "Enforce",
    "observe",
    "idle",
    "allow",
    "override-deny",
    "DENY",
    "tcp",
    "icmpv6",
    "any ",
    "ed25519",
    "ringfence.bundle/v2",
    "ringfence.delta/v2",
    "10.0.0.0/8",
    [],
    [1],
    [22, 22],
    [1, 2, 3],
    [True, 2],
    ["10.0.0.1/32"],
    [None],
    {},
    {"version": 1},
    {"version": 1, "v4": ["10.9.0.0/16"]},
    {"proto": "tcp"},
    {"proto": "udp", "ports": [53, 53], "icmp_type": None},
    {"id": "r", "action": "allow", "set": None, "services": []},
    [{"id": "m", "set": None, "services": []}, {"id": "n", "set": None, "services": [{"proto": "tcp"}]}],
    {"key_id": "c28afdb77ae53f31", "value": "AAAA"},
    [{"proto": "any", "ports": None, "icmp_type": None}],
]


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):  # big element lists: their head is enough
            out += _nodes(v, (*path, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def mutate(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    if "workload_id" in doc and rng.random() < 0.15:  # acceptance: rollback, foreign workload
        doc.update(rng.choice(({"version": doc["version"] - 1}, {"workload_id": "ord-prod-web-9"})))
        return doc
    for _ in range(rng.choice((1, 1, 1, 2))):
        path = rng.choice(_nodes(doc)[1:])
        parent, key = _get(doc, path[:-1]), path[-1]
        op = rng.randrange(9)
        if op == 0 and isinstance(parent, dict):
            del parent[key]  # missing field
        elif op == 1 and isinstance(parent, dict):
            parent[rng.choice(("extra", "Version", "members", "comment", key + "_"))] = rng.choice(ODD_VALUES)
        elif op == 2 and isinstance(parent, list):
            parent.insert(key, rng.choice(ODD_VALUES))
        elif op == 3 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += rng.choice((-1, 1, 1000))  # versions, ports: content or rollback changes
        elif op == 4 and isinstance(parent[key], str):
            parent[key] = rng.choice((parent[key] + "x", parent[key].upper(), "ord-prod-db-1", "\u00e9\U0001f600"))
        elif op == 5 and isinstance(parent[key], list) and parent[key]:
            parent[key] = parent[key][1:] if rng.random() < 0.5 else [*parent[key], parent[key][0]]
        else:
            parent[key] = rng.choice(ODD_VALUES)
    return doc


def resigned(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    """Sign mutated content with the pinned key when pydantic reads it (so it reaches acceptance)."""
    body = json.dumps({k: v for k, v in doc.items() if k != "signature"})
    try:
        model = bundle.load_bundle(body) if kind == "bundle" else bundle.load_delta(body)
    except bundle.BundleError:
        return doc
    return json.loads(bundle.dumps(bundle.sign(model, KEY)))


def text_mutation(text: str, rng: random.Random) -> str | bytes:
    op = rng.randrange(8)
    i = rng.randrange(len(text))
    if op == 0:
        return text[:i] + text[i + 1 :]
    if op == 1:
        return text[:i] + rng.choice('{}[],:"\\ 0-eE.nNtu') + text[i:]
    if op == 2:
        return "\ufeff" + text if rng.random() < 0.5 else ("\ufeff" + text).encode()
    if op == 3:
        return text.encode("utf-16")
    if op == 4:  # an escape inside some string: lone or paired surrogates, control characters
        q = text.find('"', i)
        esc = rng.choice(("\\ud800", "\\udc00", "\\ud83d\\ude00", "\\u0000", "\\u00e9", "\t", "\\x"))
        return text if q < 0 else text[: q + 1] + esc + text[q + 1 :]
    if op == 5:  # a number becomes a float, NaN, huge or at Python's digit limit
        j = next((k for k in range(i, len(text)) if text[k].isdigit() and text[k - 1] in " :["), None)
        repl = rng.choice(("1.0", "1e2", "NaN", "Infinity", "-0", "9" * 4300, "9" * 4301, "01"))
        return text if j is None else text[:j] + repl + text[j + 1 :]
    if op == 6:  # a duplicate key: which one wins must agree
        j = text.find('\n "', i)
        if j < 0:
            return text
        line = text[j + 1 : text.find("\n", j + 1)]
        return text[: j + 1] + line.rstrip(",") + ",\n" + text[j + 1 :]
    return text + rng.choice((" ", "\n", "x", "{}", "\x00"))


def _check(text: str | bytes, kind: str, applied: tuple[Any, Any] | None, tally: Counter[str]) -> None:
    expected = pyd_outcome(text, kind, applied[0] if applied else None)
    got = wire_outcome(text, kind, applied[1] if applied else None)
    tally[expected[0] if expected[0] != "refused" else "refused: " + expected[1].split("(")[-1][:20]] += 1
    assert got == expected, (text if isinstance(text, str) else text[:400])[:2000]


@pytest.mark.parametrize("path", [*BUNDLES, *DELTAS], ids=lambda p: p.name)
def test_fuzz_lean_reader_agrees_with_pydantic(path: Path) -> None:
    kind = "bundle" if path.name.startswith("bundle-") else "delta"
    original = json.loads(path.read_text())
    applied = None
    if kind == "bundle":
        applied = (bundle.load_bundle(path.read_bytes()), wire.load_bundle(path.read_bytes()))
    rng = random.Random(path.name)
    tally: Counter[str] = Counter()
    for _ in range(600):
        doc = mutate(original, rng)
        if rng.random() < 0.5:
            doc = resigned(doc, kind)
        _check(json.dumps(doc, indent=rng.choice((None, 1))), kind, applied, tally)
    for _ in range(300):
        _check(text_mutation(path.read_text(), rng), kind, applied, tally)
    # the fuzz reached every stage: malformed, bad signature, acceptance refusals and accepted documents
    assert tally["refused: malformed"] > 100 and tally["accepted"] > 20, tally
    assert any("tampered" in k for k in tally), tally
    if kind == "bundle":
        assert any("rollback" in k for k in tally) and any("replay" in k for k in tally), tally


EDGE_CASES: list[tuple[str, str | bytes, bool]] = [
    ("minimal", '{"set":"s","from_version":1,"to_version":2}', True),
    ("duplicate key: last wins", '{"set":"s","from_version":1,"to_version":"x","to_version":2}', True),
    ("duplicate key: last loses", '{"set":"s","from_version":1,"to_version":2,"to_version":"x"}', False),
    ("float for int", '{"set":"s","from_version":1,"to_version":2.0}', False),
    ("bool for int", '{"set":"s","from_version":1,"to_version":true}', False),
    ("numeric string", '{"set":"s","from_version":1,"to_version":"2"}', False),
    ("NaN", '{"set":"s","from_version":1,"to_version":NaN}', False),
    ("big int", '{"set":"s","from_version":1,"to_version":123456789012345678901234567890}', True),
    ("4300 digits", '{"set":"s","from_version":1,"to_version":' + "9" * 4300 + "}", True),
    ("4301 digits", '{"set":"s","from_version":1,"to_version":' + "9" * 4301 + "}", False),
    ("lone surrogate escape", '{"set":"\\ud800","from_version":1,"to_version":2}', False),
    ("lone low surrogate", '{"set":"\\udc00x","from_version":1,"to_version":2}', False),
    ("surrogate pair", '{"set":"\\ud83d\\ude00","from_version":1,"to_version":2}', True),
    ("escaped backslash then ud800", '{"set":"\\\\ud800","from_version":1,"to_version":2}', True),
    ("lone surrogate in str input", '{"set":"\ud800","from_version":1,"to_version":2}', False),
    ("NUL escape", '{"set":"a\\u0000","from_version":1,"to_version":2}', True),
    ("raw control character", '{"set":"a\tb","from_version":1,"to_version":2}', False),
    ("UTF-8 BOM bytes", b'\xef\xbb\xbf{"set":"s","from_version":1,"to_version":2}', False),
    ("UTF-16", '{"set":"s","from_version":1,"to_version":2}'.encode("utf-16"), False),
    ("invalid UTF-8", b'{"set":"\xff","from_version":1,"to_version":2}', False),
    ("encoded surrogate", b'{"set":"\xed\xa0\x80","from_version":1,"to_version":2}', False),
    ("trailing data", '{"set":"s","from_version":1,"to_version":2} x', False),
    ("null list", '{"set":"s","from_version":1,"to_version":2,"add":null}', False),
    ("null signature", '{"set":"s","from_version":1,"to_version":2,"signature":null}', True),
    (
        "bad alg",
        '{"set":"s","from_version":1,"to_version":2,"signature":{"alg":"rsa","key_id":"k","value":"v"}}',
        False,
    ),
    ("deep nesting", '{"set":"s","from_version":1,"to_version":2,"add":' + "[" * 3000 + "]" * 3000 + "}", False),
    ("array", "[]", False),
]


@pytest.mark.parametrize(("name", "text", "accepted"), EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_cases_of_json_reading(name: str, text: str | bytes, accepted: bool) -> None:
    def reads(load: Any) -> bool:
        try:
            load(text)
        except bundle.BundleError:
            return False
        return True

    assert reads(bundle.load_delta) is accepted  # what the contract says (pydantic, strict)
    assert reads(wire.load_delta) is accepted


def test_bundle_edge_cases() -> None:
    base = json.loads(BUNDLES[0].read_text())
    rule = base["inbound"][0]
    cases: list[tuple[dict[str, Any], bool]] = [
        ({**base, "format": None}, False),
        ({k: v for k, v in base.items() if k not in ("format", "quarantined", "failsafes", "signature")}, True),
        ({**base, "mode": "ENFORCE"}, False),
        ({**base, "inbound": [{k: v for k, v in rule.items() if k != "set"}]}, False),  # set: required, nullable
        ({**base, "inbound": [{**rule, "set": None}]}, True),
        ({**base, "inbound": [{**rule, "services": [{"proto": "tcp", "ports": [1]}]}]}, False),
        ({**base, "inbound": [{**rule, "services": [{"proto": "tcp", "ports": [1, 2, 3]}]}]}, False),
        ({**base, "inbound": [{**rule, "services": [{"proto": "tcp", "ports": {"0": 1, "1": 2}}]}]}, False),
        ({**base, "inbound": [{**rule, "services": [{"proto": "icmp", "icmp_type": 8}]}]}, True),
        ({**base, "sets": {"": {"version": 1}}, "inbound": [], "outbound": []}, True),
        ({**base, "sets": []}, False),
        ({**base, "failsafes": {"admin_ports": [{"proto": "tcp", "ports": [22, 22], "extra": 1}]}}, False),
    ]
    # grouped rules: allow-only, no own set or services, ≥ 2 members, port ranges identical or disjoint
    tcp = {"proto": "tcp", "ports": [80, 80]}
    m1 = {"id": "m1", "set": None, "services": [tcp]}
    m2 = {"id": "m2", "set": None, "services": [{"proto": "udp", "ports": [53, 53]}, tcp]}
    group = {"id": "m1", "action": "allow", "set": None, "services": [], "members": [m1, m2]}
    cases += [
        ({**base, "inbound": [group]}, True),
        ({**base, "inbound": [{**group, "members": None}]}, True),  # null = a plain rule
        ({**base, "inbound": [{**group, "members": [m1]}]}, False),
        ({**base, "inbound": [{**group, "action": "deny"}]}, False),
        ({**base, "inbound": [{**group, "set": "x"}]}, False),
        ({**base, "inbound": [{**group, "services": [tcp]}]}, False),
        (
            {
                **base,
                "inbound": [{**group, "members": [m1, {**m2, "services": [{"proto": "tcp", "ports": [80, 81]}]}]}],
            },
            False,
        ),
        # port ranges identical or disjoint; all ports, all ICMP types and any mix with anything
        ({**base, "inbound": [{**group, "members": [m1, {**m2, "services": [{"proto": "any"}]}]}]}, True),
        ({**base, "inbound": [{**group, "members": [m1, {**m2, "services": [{"proto": "tcp"}]}]}]}, True),
        (
            {
                **base,
                "inbound": [{**group, "members": [m1, {**m2, "services": [{"proto": "tcp", "ports": [0, 65535]}]}]}],
            },
            True,
        ),
        (
            {
                **base,
                "inbound": [{**group, "members": [m1, {**m2, "services": [{"proto": "tcp", "ports": [1, 65535]}]}]}],
            },
            False,
        ),
        (
            {
                **base,
                "inbound": [
                    {
                        **group,
                        "members": [
                            {
                                **m1,
                                "services": [{"proto": "icmp", "icmp_type": 8}, {"proto": "udp", "ports": [53, 54]}],
                            },
                            {**m2, "services": [{"proto": "icmp"}, {"proto": "udp"}, {"proto": "any"}]},
                        ],
                    }
                ],
            },
            True,
        ),
        (
            {
                **base,
                "inbound": [
                    {
                        **group,
                        "members": [
                            {**m1, "services": [{"proto": "udp", "ports": [53, 54]}]},
                            {**m2, "services": [{"proto": "udp"}, {"proto": "udp", "ports": [54, 54]}]},
                        ],
                    }
                ],
            },
            False,
        ),
        ({**base, "inbound": [{**group, "members": [m1, {**m2, "action": "allow"}]}]}, False),
    ]
    for doc, accepted in cases:
        text = json.dumps(doc)
        for load in (bundle.load_bundle, wire.load_bundle):
            try:
                load(text)
                ok = True
            except bundle.BundleError:
                ok = False
            assert ok is accepted, (load.__module__, text[:300])
        if accepted:
            assert wire.canonical_bytes(wire.load_bundle(text)) == bundle.canonical_bytes(bundle.load_bundle(text))


@pytest.mark.parametrize(
    ("spans", "groupable"),
    [
        ([("tcp", 80, 80), ("tcp", 80, 80), ("tcp", 81, 90), ("udp", 80, 80)], True),
        ([("tcp", 80, 90), ("tcp", 90, 90)], False),  # partial overlap in one address . proto . port set
        ([("tcp", 80, 90), ("tcp", 0, 65535), ("udp", 0, 65535)], True),  # all ports: address . proto set
        ([("tcp", 80, 90), ("tcp", 1, 65535)], False),  # not all ports: still a port range
        ([("icmp", 8, 8), ("icmp", 0, 255), ("icmpv6", 0, 255)], True),
        ([("any", 0, 0), ("tcp", 22, 22), ("tcp", 0, 65535)], True),  # any: an address-only set
        ([("any", 0, 0), ("tcp", 20, 22), ("tcp", 22, 25)], False),
    ],
)
def test_spans_groupable(spans: list[tuple[str, int, int]], groupable: bool) -> None:
    assert wire.spans_groupable(spans) is groupable
    assert bundle.spans_groupable(reversed(spans)) is groupable  # one definition, order-free


def test_errors_name_the_field() -> None:
    with pytest.raises(wire.BundleError, match=r"ringfence.bundle/v2 document: workload_id: Field required"):
        wire.load_bundle('{"format": "ringfence.bundle/v2", "version": 1}')
    doc = json.loads(BUNDLES[0].read_text())
    doc["inbound"][0]["services"][0]["proto"] = "sctp"
    with pytest.raises(wire.BundleError, match=r"inbound\.0\.services\.0\.proto: Input should be 'tcp'"):
        wire.load_bundle(json.dumps(doc))
    with pytest.raises(wire.BundleError, match=r"^not a valid ringfence.delta/v2 document: extra: Extra inputs"):
        wire.load_delta('{"set":"s","from_version":1,"to_version":2,"extra":1}')


def test_lean_sign_matches_pydantic_sign() -> None:
    model = bundle.load_bundle(BUNDLES[0].read_bytes())
    lean = bundle.to_wire(model)
    assert wire.sign(dataclasses.replace(lean, version=9), KEY) == bundle.to_wire(
        bundle.sign(model.model_copy(update={"version": 9}), KEY)
    )


# --- Ed25519 through the process's libcrypto ---------------------------------------------------------

ED25519_L = 2**252 + 27742317777372353535851937790883648493
SMALL_ORDER_KEYS = [
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    )
]


def test_libcrypto_and_cryptography_give_the_same_ed25519_verdicts() -> None:
    import ctypes

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    lib = wire.loaded_libcrypto()
    if lib is None:
        pytest.skip("no libcrypto mapped in this interpreter (the agent falls back to cryptography)")
    rng = random.Random(25519)
    cases: list[tuple[bytes, bytes, bytes]] = []
    for _ in range(200):
        private = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        raw = private.public_key().public_bytes_raw()
        msg = rng.randbytes(rng.randrange(0, 300))
        sig = private.sign(msg)
        i = rng.randrange(64)
        s_plus_l = int.from_bytes(sig[32:], "little") + ED25519_L  # the same S, not reduced: must fail
        cases += [
            (raw, sig, msg),
            (raw, sig[:i] + bytes([sig[i] ^ (1 << rng.randrange(8))]) + sig[i + 1 :], msg),
            (raw, sig, msg + b"\0"),
            (raw, sig[:63], msg),
            (raw, sig + b"\0", msg),
            (raw, b"", msg),
            (rng.randbytes(32), sig, msg),  # often not a curve point at all
        ]
        if s_plus_l < 2**256:
            cases.append((raw, sig[:32] + s_plus_l.to_bytes(32, "little"), msg))
    identity_r = bytes.fromhex("01" + "00" * 31)
    for key in SMALL_ORDER_KEYS:
        cases += [(key, identity_r + b"\0" * 32, b"any message"), (key, key + b"\0" * 32, b"")]
    verdicts = Counter()
    for raw, sig, msg in cases:
        ours = wire.LibcryptoEd25519(lib, raw).verify(sig, msg)
        assert ours == wire.cryptography_ed25519(raw)(sig, msg), (raw.hex(), sig.hex(), msg.hex())
        verdicts[ours] += 1
    assert verdicts[True] >= 200 and verdicts[False] >= 1000, verdicts
    peek = lib.ERR_peek_error
    peek.restype, peek.argtypes = ctypes.c_ulong, []
    assert peek() == 0  # failures leave no queued OpenSSL errors behind


def test_verifier_falls_back_to_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = wire.load_bundle(BUNDLES[0].read_bytes())
    monkeypatch.setenv("RINGFENCE_ED25519", "cryptography")
    wire.loaded_libcrypto.cache_clear()
    try:
        assert wire.loaded_libcrypto() is None
        fallback = wire.Verifier.from_file(PUBLIC)
        fallback.verify(doc)
        with pytest.raises(wire.BundleError, match="does not verify"):
            fallback.verify(dataclasses.replace(doc, version=doc.version + 1))
    finally:
        monkeypatch.delenv("RINGFENCE_ED25519")
        wire.loaded_libcrypto.cache_clear()
