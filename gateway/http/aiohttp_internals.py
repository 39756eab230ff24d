"""Every name the gateway takes from aiohttp's internals, in one place. Written against aiohttp
3.14 (setup.cfg pins `aiohttp>=3.14,<3.15`): none of these is aiohttp's public API, so a new
minor release is read against this list before the pin moves.

Why each is needed:

- `RequestHandler`, `ERROR`, `_ErrInfo`, `RawRequestMessage`, `HttpVersion11`, `BaseRequest`,
  `StreamReader`, `EmptyStreamReader`, `BadHttpMethod`, `HttpProcessingError`: gateway.http.server
  subclasses aiohttp's per-connection handler to answer what it cannot parse in the registry's
  error format, to take a connection over from the fast path with the bytes already read, and to
  keep a head's deadline across requests. Its `_make_server` swaps the handler class in.
- `must_be_empty_body`, `should_remove_content_length`, `rfc822_formatted_time`,
  `SINGLETON_HEADERS`: the fast path (gateway.http.fastpath) writes answers as aiohttp would
  (which statuses carry no body and no length, the Date format, the headers its parser refuses
  twice), so that a client cannot tell the two paths apart.
"""

from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.http_parser import SINGLETON_HEADERS, RawRequestMessage
from aiohttp.streams import EmptyStreamReader, StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

__all__ = [
    "ERROR",
    "SINGLETON_HEADERS",
    "BadHttpMethod",
    "BaseRequest",
    "EmptyStreamReader",
    "ErrInfo",
    "HttpProcessingError",
    "HttpVersion11",
    "RawRequestMessage",
    "RequestHandler",
    "StreamReader",
    "must_be_empty_body",
    "rfc822_formatted_time",
    "should_remove_content_length",
]

ErrInfo = _ErrInfo  # a public name of ours for aiohttp's private one
