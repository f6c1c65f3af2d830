"""Test doubles of the source package: synthetic cameras (`synthetic[:options]`), fault injectors and pixel stamps.

They ship on the device because `edge-pfm bench`, `edge-pfm selftest` and `--white synthetic` use them, but no
clinical path imports them: a real camera never goes through this folder.
"""
