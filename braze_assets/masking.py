"""PII masking for logs and UI metadata: identifiers are shown only in part."""

from __future__ import annotations

import re

_PHONE = re.compile(r"^\+?[\d\s().-]{7,}$")


def mask(value: object) -> str:
    """`jane.doe@example.com` -> `j***@e***.com`; `+14155550123` -> `***23`; `user-12345` -> `use***`."""
    if value is None:
        return ""
    text = str(value)
    if "@" in text:
        local, _, domain = text.partition("@")
        name, dot, tld = domain.rpartition(".")
        return f"{local[:1]}***@{(name or tld)[:1]}***{dot}{tld if name else ''}"
    if _PHONE.match(text):
        return "***" + re.sub(r"\D", "", text)[-2:]
    return text[:3] + "***" if len(text) > 6 else "***"


def mask_identifiers(identifiers: dict) -> str:
    """A row's identifier for display: `EXTERNAL_ID=use***`."""
    parts = []
    for kind, value in identifiers.items():
        if kind == "ALIAS":
            parts.append(f"ALIAS={mask(value[0])}/{value[1] or ''}")
        else:
            parts.append(f"{kind}={mask(value)}")
    return ", ".join(parts) or "(none)"
