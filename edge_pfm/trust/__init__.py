"""What the device trusts: the keys that may sign a bundle, the device's own state (the rollback floor, the secret
that seals the engine cache), and the verification of a signed bundle.

    settings.py       Trust: trusted_keys + state_dir, from [security] in device.toml
    signature.py      verify a bundle signed by `python -m export.sign` (OpenSSF model-signing format)
    rollback.py       the lowest bundle_version this device still runs
    device_secret.py  the per-device HMAC key that seals engine sidecars, check verdicts and precision picks

Nothing here imports a signing library at import time: `cryptography` is imported when a signature is verified.
"""
from edge_pfm.trust.settings import DEFAULT_STATE_DIR, DEFAULT_TRUSTED_KEYS, Trust

__all__ = ["DEFAULT_STATE_DIR", "DEFAULT_TRUSTED_KEYS", "Trust"]
