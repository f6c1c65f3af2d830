"""Verify a bundle signed by `python -m export.sign`: the OpenSSF model-signing format (key mode, ECDSA P-256),
checked with `cryptography` alone.

The signature file (`bundle.sig`, inside the bundle) is a Sigstore bundle holding a DSSE envelope; its payload is
an in-toto statement that lists every file of the bundle with its sha256. Verification: no symlink anywhere in the
bundle; the envelope signed by a trusted key (the key id is model-signing's hint: the sha256 of the signer's PEM
public key); then the bundle's files are exactly the listed ones (no extra, none missing) with the listed digests.

Why not model-signing itself on the device: it verifies the files on disk and returns nothing, so the bytes a
backend loads afterwards would be unverified; this returns the verified digests (and the manifest's verified
bytes), and the bundle checks each artifact's bytes against them as it loads them. It also keeps the device to one
dependency (model-signing pulls in sigstore, tuf, pydantic and 30 more packages, and 0.6 s of imports).
`tests/test_signed_bundles.py` checks that both agree.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_pfm.errors import EdgePfmError
from edge_pfm.fileio import sha256_file

SIGNATURE_FILE = "bundle.sig"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
MANIFEST = "manifest.json"


class SignatureError(EdgePfmError, ValueError):
    """A bundle is refused by the device's trust: unsigned, badly signed, by an untrusted key, changed, rolled back,
    or unverifiable here. Exit 2; the message names the reason and the file."""


@dataclass(frozen=True)
class Verdict:
    """What a bundle's signature says, as verified on this device."""

    signed: bool
    verified: bool
    key_id: str | None = None  # sha256 of the signer's PEM public key (model-signing's key hint)
    bundle_version: int | None = None
    note: str = ""
    digests: dict[str, str] = field(default_factory=dict, repr=False)  # every signed file -> its verified sha256

    def describe(self) -> str:
        version = f", bundle version {self.bundle_version}" if self.bundle_version is not None else ""
        if self.verified:
            return f"signed by key {self.key_id[:16]}{version}: verified"
        return self.note or f"unsigned{version}: not verified"

    def to_record(self) -> dict:
        """The run header's `signature` entry."""
        return {"verified": self.verified, "signed": self.signed, "key_id": self.key_id,
                "bundle_version": self.bundle_version, "note": self.describe()}


def key_id(public_key_pem: bytes) -> str:
    return hashlib.sha256(public_key_pem).hexdigest()


def _cryptography():
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as exc:  # fail closed: a configured key without the library never means "unsigned"
        raise SignatureError(f"trusted keys are configured but bundle signatures cannot be verified here: {exc}. "
                             "Install it (pip install cryptography); until then no bundle runs") from exc
    return exceptions, hashes, serialization, ec


def trusted_public_keys(key_files: list[Path]) -> dict[str, object]:
    """key id -> public key, for every PEM file given; a file that is not an EC P-256/384/521 public key is refused."""
    _, _, serialization, ec = _cryptography()
    keys = {}
    for path in key_files:
        pem = path.read_bytes()
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise SignatureError(f"trusted key {path} is not a PEM public key ({exc}); put the .pub file that "
                                 "python -m export.sign --new-key wrote there") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size not in (256, 384, 521):
            raise SignatureError(f"trusted key {path} is not an EC P-256/384/521 key, which model-signing's key mode "
                                 "uses")
        # the hint is over the key's canonical PEM, as model-signing computes it
        canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        keys[key_id(canonical)] = key
    return keys


def bundle_files(root: Path) -> list[str]:
    """Every file under `root` as a POSIX path relative to it, sorted; raises SignatureError on a symlink (a link
    can point a verified name at bytes outside the bundle)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise SignatureError(f"{p} is a symlink: a signed bundle holds plain files only; copy the file it "
                                     "points to into the bundle and sign it again")
        found += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames]
    return sorted(found)


def _pae(payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    return b" ".join([f"DSSEv1 {len(PAYLOAD_TYPE)} {PAYLOAD_TYPE} {len(payload)}".encode(), payload])


def _statement(sig_path: Path, raw: bytes, keys: dict[str, object]) -> tuple[str, dict]:
    """-> (signer's key id, the signed in-toto statement), or SignatureError."""
    exceptions, hashes, _, ec = _cryptography()
    try:
        doc = json.loads(raw)
        hint = doc["verificationMaterial"]["publicKey"]["hint"]
        envelope = doc["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        payload_type = envelope["payloadType"]
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"{sig_path} is not a model-signing signature ({type(exc).__name__}: {exc}); sign the "
                             "bundle again: python -m export.sign --bundle B --key KEY.pem") from exc
    if payload_type != PAYLOAD_TYPE:
        raise SignatureError(f"{sig_path}: payload type {payload_type!r} is not {PAYLOAD_TYPE}")
    key = keys.get(hint)
    if key is None:
        trusted = ", ".join(k[:16] for k in sorted(keys)) or "none"
        raise SignatureError(f"{sig_path}: signed by key {str(hint)[:16]}, which this device does not trust "
                             f"(trusted: {trusted}); install its public key in the trusted keys directory, or have "
                             "the bundle signed by a trusted key")
    try:
        digest = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}[key.curve.key_size]
        key.verify(signature, _pae(payload), ec.ECDSA(digest()))
    except exceptions.InvalidSignature:
        raise SignatureError(f"{sig_path}: bad signature: the signed statement was altered, or the signature was "
                             f"not made by key {hint[:16]}; restore the bundle as signed") from None
    try:
        statement = json.loads(payload)
    except ValueError as exc:
        raise SignatureError(f"{sig_path}: the signed statement is not JSON ({exc})") from exc
    return hint, statement


def _signed_digests(sig_path: Path, statement: dict) -> dict[str, str]:
    try:
        ok = statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
        serialization = statement["predicate"]["serialization"]
        resources = statement["predicate"]["resources"]
        digests = {r["name"]: r["digest"] for r in resources if r["algorithm"] == "sha256"}
    except (KeyError, TypeError) as exc:
        raise SignatureError(f"{sig_path}: the signed statement is not a model-signing manifest ({exc})") from exc
    if not ok or serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
        raise SignatureError(f"{sig_path}: signed with settings this device does not verify (it needs model-signing's "
                             f"per-file sha256 serialization, got {serialization}); sign with python -m export.sign")
    if serialization.get("allow_symlinks") or len(digests) != len(resources):
        raise SignatureError(f"{sig_path}: the signature allows symlinks or hashes other than sha256; sign with "
                             "python -m export.sign")
    return digests


def verify_bundle(root: str | os.PathLike, key_files: list[Path]) -> tuple[Verdict, bytes]:
    """-> (the verdict, the manifest's bytes as verified); raises SignatureError naming the reason and the file.
    Every file of the bundle is read once and hashed; the manifest is returned from that one read, so the manifest
    the device then parses is the one that was signed."""
    root = Path(root)
    keys = trusted_public_keys(key_files)
    files = bundle_files(root)
    sig_path = root / SIGNATURE_FILE
    if SIGNATURE_FILE not in files:
        raise SignatureError(f"{root} is unsigned (no {SIGNATURE_FILE}) and this device runs signed bundles only; "
                             "sign it on the build machine: python -m export.sign --bundle B --key KEY.pem")
    signer, statement = _statement(sig_path, sig_path.read_bytes(), keys)
    signed = _signed_digests(sig_path, statement)
    on_disk = set(files) - {SIGNATURE_FILE}
    extra, missing = sorted(on_disk - set(signed)), sorted(set(signed) - on_disk)
    if extra:
        raise SignatureError(f"{root / extra[0]}: a file the signature does not cover ({len(extra)} extra: "
                             f"{', '.join(extra[:5])}); remove it, or restore the bundle as signed")
    if missing:
        raise SignatureError(f"{root / missing[0]}: signed but missing ({len(missing)} missing: "
                             f"{', '.join(missing[:5])}); copy the whole bundle again")
    manifest_bytes = b""
    for name in sorted(signed):
        data = (root / name).read_bytes() if name == MANIFEST else None
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(root / name)
        if digest != signed[name]:
            raise SignatureError(f"{root / name}: changed after signing (sha256 {digest[:12]}..., signed "
                                 f"{signed[name][:12]}...); restore the bundle as signed")
        if data is not None:
            manifest_bytes = data
    if not manifest_bytes:
        raise SignatureError(f"{root}: the signature does not cover a {MANIFEST}")
    try:
        version = json.loads(manifest_bytes).get("bundle_version")
    except ValueError as exc:
        raise SignatureError(f"{root / MANIFEST}: not JSON ({exc})") from exc
    return Verdict(signed=True, verified=True, key_id=signer, bundle_version=version, digests=signed), manifest_bytes


def unverified(root: str | os.PathLike, trusted_keys: Path, bundle_version: int | None) -> Verdict:
    """The verdict when no key is trusted: bundles run, and every command says they were not verified."""
    hint = None
    sig = Path(root) / SIGNATURE_FILE
    if sig.is_file():
        try:
            hint = str(json.loads(sig.read_bytes())["verificationMaterial"]["publicKey"]["hint"])
        except (OSError, ValueError, KeyError, TypeError):
            hint = "?"
    v = f", bundle version {bundle_version}" if bundle_version is not None else ""
    note = (f"signed by key {hint[:16]}{v}, not verified: no trusted key in {trusted_keys}" if hint
            else f"unsigned{v}: not verified (no trusted key in {trusted_keys})")
    return Verdict(signed=bool(hint), verified=False, key_id=hint, bundle_version=bundle_version, note=note)
