"""Keep credentials out of logs and published events.

``mask_url`` hides the userinfo of a URL (``redis://:PASSWORD@host``, ``http://user:TOKEN@gpu-pool``)
and the values of secret-looking query parameters (``?api_key=``, ``X-Amz-Signature=``...).
``mask_urls_in`` does it for every URL inside free text (exception messages, log fields), and
``mask_log_secrets`` is a structlog processor applying it to every string field of every log line, so
a URL logged anywhere — including inside a library's error message — never carries its secret.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_PARAM = re.compile(
    r"(pass(word)?|secret|token|api[-_]?key|apikey|auth|credential|signature|sig|access[-_]?key)", re.I
)
# scheme://[userinfo@]rest — userinfo may hold any character but '/', '@' and whitespace
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)([^\s/@]*@)?([^\s'\"<>]*)")


def mask_url(url: str) -> str:
    """``url`` without its password/user and secret query values; unchanged if it holds none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL.sub(_mask_match, url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_match(m: re.Match[str]) -> str:
    scheme, userinfo, rest = m.group(1), m.group(2), m.group(3)
    masked = f"{scheme}{MASK}@{rest}" if userinfo else m.group(0)
    if "?" in rest:
        masked = mask_url(masked)
    return masked


def mask_urls_in(text: str) -> str:
    """Every URL inside ``text`` masked (cheap when there is none: one regex scan)."""
    if "://" not in text:
        return text
    return _URL.sub(_mask_match, text)


def mask_log_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask URLs in every string value (and in lists/tuples of strings)."""
    for k, v in event_dict.items():
        if isinstance(v, str):
            if "://" in v:
                event_dict[k] = mask_urls_in(v)
        elif isinstance(v, list | tuple) and any(isinstance(x, str) and "://" in x for x in v):
            event_dict[k] = type(v)(mask_urls_in(x) if isinstance(x, str) else x for x in v)
    return event_dict
