"""python -m export.sign --bundle BUNDLE --key PRIVATE.pem
python -m export.sign --new-key DIR

Signs a whole bundle directory with OpenSSF model-signing in key mode (ECDSA P-256), offline. The signature,
bundle.sig, lives inside the bundle and covers every file: a device with the public key trusted refuses the bundle
if a file is added, removed or changed, if it holds a symlink, or if it was signed by another key. Sign last:
calibration (and export.check --record) rewrite the bundle, which voids a signature; they remove it and say so.

--new-key DIR writes a key pair: DIR/signing_key.pem (the private key, owner-only) and DIR/signing_key.pub (the
public key, for the device's trusted keys directory). Neither a bundle nor a git work tree gets a private key:
DIR inside either is refused, unless git ignores it (as build/ is).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_pfm.errors import EdgePfmError

PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "signing_key.pem", "signing_key.pub"


class SigningError(EdgePfmError, ValueError):
    """A bundle or a key cannot be signed with or written; the message names the file and the fix."""


def _inside_bundle(path: Path) -> Path | None:
    for d in [path, *path.parents]:
        if (d / "manifest.json").is_file():
            return d
    return None


def _in_git_tree_unignored(path: Path) -> Path | None:
    """The git work tree holding `path`, unless git ignores `path` there (build/ is ignored: a demo key may live
    in it, never in a tracked folder)."""
    top = next((d for d in [path, *path.parents] if (d / ".git").exists()), None)
    if top is None:
        return None
    try:
        ignored = subprocess.run(["git", "-C", str(top), "check-ignore", "-q", str(path)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no git here: cannot tell, so refuse
        ignored = False
    return None if ignored else top


def new_key(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write a fresh ECDSA P-256 key pair into `directory` -> (private key path, public key path). The private key
    is created owner-only (0600) and never overwritten."""
    from edge_pfm._lazy import require

    require("cryptography", "writing a signing key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory).absolute()
    if (bundle := _inside_bundle(d)) is not None:
        raise SigningError(f"{d} is inside the bundle {bundle}: a private key must never travel with a bundle; "
                           "choose a directory outside it")
    if (repo := _in_git_tree_unignored(d)) is not None:
        raise SigningError(f"{d} is inside the git work tree {repo} and not ignored by it: a private key must never "
                           "be committed; choose a directory outside the repository (or an ignored one, as build/)")
    private, public = d / PRIVATE_KEY_FILE, d / PUBLIC_KEY_FILE
    if private.exists() or public.exists():
        raise SigningError(f"{private} or {public} already exists: a key is never overwritten; choose another "
                           "directory, or remove the old pair if it was never used to sign a bundle")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only from the first byte
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign_bundle(bundle_dir: str | os.PathLike, private_key: str | os.PathLike, log=print) -> dict:
    """Sign `bundle_dir` with `private_key`; -> the verified signature record (key id, version, files). The bundle
    is checked first (its manifest, every artifact's sha256, a bundle_version), the signature is written atomically,
    then verified back with the device's own verifier."""
    from edge_pfm._lazy import require
    from edge_pfm.bundle import Bundle
    from edge_pfm.trust import Trust
    from edge_pfm.trust.signature import SIGNATURE_FILE, bundle_files, key_id, verify_bundle

    root, key_path = Path(bundle_dir), Path(private_key)
    if not key_path.is_file():
        raise SigningError(f"private key {key_path} does not exist; write a pair with python -m export.sign "
                           "--new-key DIR")
    if _inside_bundle(key_path.absolute().parent) == root.absolute():
        raise SigningError(f"{key_path} is inside the bundle {root}: a private key must never be signed into one")
    # the bundle as it stands must be whole: nothing corrupt gets signed (no trust: the signature is not checked)
    bundle = Bundle.load(root, trust=Trust(trusted_keys=Path("/nonexistent")))
    if bundle.manifest.get("bundle_version") is None:
        raise SigningError(f"{root / 'manifest.json'} has no bundle_version (an export from before signing); "
                           "re-export it (python -m export ... --bundle-version N) and sign that")
    bundle_files(root)  # a symlink is refused here, with its name
    model_signing = require("model_signing", "signing a bundle (pip install -e '.[sign]')")
    from cryptography.hazmat.primitives import serialization

    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.sig-") as tmp:
        staged = Path(tmp) / SIGNATURE_FILE  # beside the bundle, same filesystem: moved in by one rename
        try:
            (model_signing.signing.Config().use_elliptic_key_signer(private_key=key_path)
             .set_hashing_config(hashing).sign(root, staged))
        except ValueError as exc:  # model-signing's own refusals (an unsupported key, a symlink)
            raise SigningError(f"model-signing refused to sign {root} with {key_path}: {exc}") from exc
        os.replace(staged, root / SIGNATURE_FILE)
    private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory() as keys:  # verify back as a device that trusts this key would
        (Path(keys) / PUBLIC_KEY_FILE).write_bytes(public_pem)
        verdict, _ = verify_bundle(root, [Path(keys) / PUBLIC_KEY_FILE])
    assert verdict.key_id == key_id(public_pem)
    log(f"signed {root}: {len(verdict.digests)} files, key {verdict.key_id[:16]}, bundle version "
        f"{verdict.bundle_version} ({root / SIGNATURE_FILE})")
    return verdict.to_record() | {"files": len(verdict.digests)}


def void_signature(root: str | os.PathLike, rewritten_by: str, log=print) -> bool:
    """Remove the signature of a bundle that `rewritten_by` is rewriting (it would no longer verify) and say so;
    -> whether there was one."""
    from edge_pfm.trust.signature import SIGNATURE_FILE

    sig = Path(root) / SIGNATURE_FILE
    if not sig.exists():
        return False
    sig.unlink()
    log(f"{rewritten_by} rewrites the bundle, which voids its signature: {SIGNATURE_FILE} removed. Sign it again "
        "when it is final: python -m export.sign --bundle BUNDLE --key PRIVATE.pem")
    return True


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m export.sign` (the docs' CLI reference is generated from it)."""
    ap = argparse.ArgumentParser(prog="python -m export.sign", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", help="the bundle directory to sign (signature: BUNDLE/bundle.sig)")
    what.add_argument("--new-key", metavar="DIR", help="write a new ECDSA P-256 key pair into DIR")
    ap.add_argument("--key", metavar="PRIVATE.pem", help="with --bundle: the private key to sign with")
    return ap


def main(argv: list[str] | None = None) -> int:
    from edge_pfm.errors import run_command

    ap = build_parser()
    args = ap.parse_args(argv)
    if args.bundle and not args.key:
        ap.error("--bundle needs --key PRIVATE.pem")
    if args.new_key and args.key:
        ap.error("--key goes with --bundle")

    def command() -> None:
        if args.new_key:
            private, public = new_key(args.new_key)
            print(f"wrote {private} (private, owner-only: keep it off the device and out of any repository)")
            print(f"wrote {public} (public: install it in the device's trusted keys directory, "
                  "/etc/edge-pfm/trusted_keys/ by default)")
        else:
            sign_bundle(args.bundle, args.key)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
