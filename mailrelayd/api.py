"""The HTTP submission API: ``POST /v1/messages`` on ``[api] address``.

Authentication: ``Authorization: Bearer <key>``; keys are created by ``mailrelayd user apikey`` and
stored as SHA-256 hashes in the users file, so a key acts as its user (``allowed_from``, rate).

Bodies:

- ``Content-Type: message/rfc822``: the message as is; the envelope from ``?from=`` and ``&to=``
  (repeatable, or comma-separated), or else from the From / To, Cc, Bcc headers (Bcc removed);
- ``Content-Type: application/json``: ``{"from", "to": [...], "cc", "bcc", "subject", "text",
  "html", "headers": {...}}``; the MIME message is built with the standard library.

The message then goes through the same checks, header completion, DKIM and durable spool commit as
SMTP (:class:`~mailrelayd.submit.LocalSubmitter`). ``202 {"queue_id": ...}`` once it is durable;
errors are JSON ``{"error": {"code", "enhanced", "message"}}`` with the SMTP reply SMTP would give.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import json
import re
import ssl
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header
from email.message import EmailMessage
from typing import Any

from aiohttp import web

from mailrelayd import metrics
from mailrelayd.apifields import FieldTooLong, encoded_words, header_field, headers_refusal
from mailrelayd.config import Config
from mailrelayd.errors import DkimSignError, MessageRefused, Reply, SpoolError, address_refusal, reply_for
from mailrelayd.httpguard import HEADER_TIMEOUT, WRITE_TIMEOUT, Handler, HttpGuard
from mailrelayd.log import get_logger
from mailrelayd.sendmail import EX_NOUSER, PrepareError, prepare
from mailrelayd.smtp.address import AddressError, header_addresses, parse_header_mailboxes
from mailrelayd.submit import LocalSubmitter, Refused, to_crlf
from mailrelayd.users import User, api_key_hash

log = get_logger()

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required: send Authorization: Bearer <API key>")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
BAD_TYPE = Reply(554, "5.6.1", "Content-Type must be message/rfc822 or application/json")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
NOT_IDENTITY = Reply(554, "5.6.1", "Content-Encoding is not supported: send the body uncompressed")
BODY_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded reading the request body")
FROM_REQUIRED = Reply(550, "5.6.0", "from is required (one address, \"Name <addr>\" allowed)")
# What aiohttp's router raises, as SMTP would answer an unknown or misused command (RFC 5321 §4.2.4).
NOT_FOUND = Reply(500, "5.5.1", "No such resource: the API is POST /v1/messages")
NOT_ALLOWED = Reply(502, "5.5.1", "Method not allowed: the API is POST /v1/messages")
# Also what str.splitlines() splits at: Python-based readers would see a new line there.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
MAX_HEADER_TEXT = 100 * 1024  # Postfix's header_size_limit; bounds the work of building the fields


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice. RFC 8259 §4 leaves the meaning open and parsers disagree
    (first or last wins), so a proxy or a log may read another ``to`` than the one we would send to."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"duplicate key {k!r} in the JSON body")
        out[k] = v
    return out


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_pairs)


class BadRequest(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Submission:
    """A request read: the envelope, the CRLF message, and the recipients refused while reading it."""

    mail_from: str
    recipients: list[str]
    data: bytes
    refused: list[Refused] = field(default_factory=list)


@dataclass(frozen=True)
class ApiContext:
    """What a request needs, swapped as a whole on reload."""

    cfg: Config
    keys: dict[str, User] = field(default_factory=dict)
    submitter: LocalSubmitter | None = None


def http_status(r: Reply) -> int:
    """The HTTP status for an SMTP refusal."""
    if r.enhanced == "4.7.1":
        return 429  # over the user's sending rate
    if r.code < 500:
        return 503
    if r.enhanced.startswith("5.7.8") or r.code in (530, 535):
        return 401
    if r.enhanced == "5.3.4":
        return 413
    if r.enhanced.startswith("5.7"):
        return 403
    if r.enhanced == "5.6.1":
        return 415
    return 400 if r.enhanced.startswith(("5.5", "5.6")) else 422


def error_response(r: Reply, status: int | None = None) -> web.Response:
    status = status or http_status(r)
    metrics.API_REQUESTS.labels(str(status)).inc()
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response({"error": {"code": r.code, "enhanced": r.enhanced, "message": r.text}},
                             status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An HTTPException raised outside post_message (the router's 404 and 405) as the API's other errors:
    JSON with an SMTP reply, counted in api_requests_total. aiohttp writes them as text otherwise."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reply = {404: NOT_FOUND, 405: NOT_ALLOWED}.get(e.status) or Reply(554, "5.5.0", e.reason)
        resp = error_response(reply, e.status)
        if "Allow" in e.headers:  # RFC 9110 §15.5.6: a 405 names the methods that are allowed
            resp.headers["Allow"] = e.headers["Allow"]
        return resp


def _addresses(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise BadRequest(Reply(501, "5.5.4", f"{key} must be a string or an array of strings"))
    for v in items:
        _check_text(v, key)
    return [v for v in items if v.strip()]


def _check_text(value: str, what: str) -> None:
    """A value bound for a header field: no line breaks or other controls, not even RFC 2047-encoded
    (a decoder turns "=?utf-8?q?=0D=0ABcc:...?=" into a field of its own)."""
    if _CONTROL.search(value):
        raise BadRequest(Reply(501, "5.5.4", f"{what}: line breaks and control characters are not allowed"))
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows "\ud800" escapes
            raise BadRequest(Reply(501, "5.5.4", f"{what}: lone surrogates are not text")) from None
    if "=?" in value:
        try:
            words = decode_header(value)
        except HeaderParseError:  # not decodable: a reader shows it as is
            words = []
        if any(isinstance(w, bytes) and _CONTROL_BYTES.search(w) for w, _ in words):
            raise BadRequest(Reply(501, "5.5.4", f"{what}: encoded line breaks and control characters are not allowed"))


def _field(name: str, value: str) -> bytes:
    try:
        return header_field(name, value)
    except FieldTooLong as e:
        raise BadRequest(Reply(501, "5.5.4", str(e)[:200])) from None


def _address_field(name: str, items: list[str]) -> bytes:
    """To or Cc from valid entries. ASCII entries as given (the email package wrote them so too); others,
    and all of them when a display name has a word too long for a line, rewritten with their display
    names as RFC 2047 encoded words (§5 (3)). The addresses themselves must be ASCII here."""
    parts = [item if item.isascii() else _mailboxes_text(name, item, False) for item in items]
    try:
        return header_field(name, ", ".join(parts))
    except FieldTooLong:
        return _field(name, ", ".join(_mailboxes_text(name, item, True) for item in items))


def _mailboxes_text(name: str, item: str, encode_all: bool) -> str:
    out = []
    for display, addr in header_addresses([item]):
        if not addr.isascii():
            raise BadRequest(Reply(553, "5.6.7", f"{name.lower()}: non-ASCII addresses need the message/rfc822 "
                                                 "form"))
        if display and (encode_all or not display.isascii()):
            out.append(f"{' '.join(encoded_words(display))} <{addr}>")
        else:
            out.append(email.utils.formataddr((display, addr)))
    return ", ".join(out)


# Fields of the "headers" object that hold mailboxes (RFC 5322 §3.6.2; RFC 2369's and the
# Mail-Followup-To draft's): written as To and Cc are.
_ADDRESS_HEADERS = frozenset({"reply-to", "sender", "mail-reply-to", "mail-followup-to"})


def _recipients(items: list[str]) -> tuple[list[str], list[str], list[Refused]]:
    """(entries that are valid, their envelope addresses, refusals of the others). Each entry is read
    as the header From is (every mailbox valid, no group), so that what goes into To/Cc is what we
    deliver to; one that is not is refused as RCPT would refuse it (553 5.1.3) and is left out of the
    header, as the message/rfc822 form lists it in "rejected"."""
    valid: list[str] = []
    addresses: list[str] = []
    refused: list[Refused] = []
    for item in items:
        try:
            boxes = parse_header_mailboxes(item)
        except AddressError as e:
            refused.append(Refused(item, address_refusal(e, sender=False)))
            continue
        valid.append(item)
        addresses.extend(str(b) for b in boxes)
    return valid, addresses, refused


def build_json_message(doc: Any) -> Submission:
    """The envelope and CRLF message of the JSON form (recipients with unreadable addresses refused)."""
    if not isinstance(doc, dict):
        raise BadRequest(Reply(501, "5.5.4", "body must be a JSON object"))
    unknown = set(doc) - {"from", "to", "cc", "bcc", "subject", "text", "html", "headers"}
    if unknown:
        raise BadRequest(Reply(501, "5.5.4", f"unknown field {sorted(unknown)[0]!r}"))
    frm = _addresses(doc.get("from"), "from")
    if len(frm) != 1:
        raise BadRequest(FROM_REQUIRED)
    sender = _json_sender(frm[0])
    to, cc, bcc = (_addresses(doc.get(k), k) for k in ("to", "cc", "bcc"))
    subject = doc.get("subject", "")
    if not isinstance(subject, str):
        raise BadRequest(Reply(501, "5.5.4", "subject must be a string"))
    _check_text(subject, "subject")
    headers = doc.get("headers")
    headers = {} if headers is None else headers
    if not isinstance(headers, dict):
        raise BadRequest(Reply(501, "5.5.4", "headers must be an object of name: value"))
    for name, value in headers.items():
        if not isinstance(value, str):
            raise BadRequest(Reply(501, "5.5.4", f"header {name[:80]!r} must have a string value"))
        _check_text(value, f"header {name[:80]}")
    refusal = headers_refusal(headers)
    if refusal is not None:
        raise BadRequest(refusal)
    header_text = sum(map(len, (*frm, *to, *cc, *bcc, subject, *headers, *headers.values())))
    if header_text > MAX_HEADER_TEXT:
        raise BadRequest(Reply(552, "5.3.4", f"header fields too large (over {MAX_HEADER_TEXT} characters)"))
    text, html = doc.get("text"), doc.get("html")
    if not any(isinstance(x, str) for x in (text, html)) or \
            any(x is not None and not isinstance(x, str) for x in (text, html)):
        raise BadRequest(Reply(501, "5.5.4", "text and/or html (strings) are required"))
    to, to_rcpts, to_refused = _recipients(to)
    cc, cc_rcpts, cc_refused = _recipients(cc)
    _, bcc_rcpts, bcc_refused = _recipients(bcc)
    fields = [_address_field("From", frm)]
    if to:
        fields.append(_address_field("To", to))
    if cc:
        fields.append(_address_field("Cc", cc))
    fields.append(_field("Subject", subject))
    for name, value in headers.items():
        if name.lower() in _ADDRESS_HEADERS:
            # Encoded words are for display names only (RFC 2047 §5): the whole value in one would
            # hide the address from every reader.
            try:
                parse_header_mailboxes(value)
            except AddressError as e:
                raise BadRequest(Reply(501, "5.5.4", f"header {name[:80]}: {e}"[:200])) from None
            fields.append(_address_field(name, [value]))
        else:
            fields.append(_field(name, value))
    msg = EmailMessage(policy=email.policy.SMTP)  # the body and its MIME fields only
    try:
        if isinstance(text, str):
            msg.set_content(text)
            if isinstance(html, str):
                msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
        data = b"".join(fields) + msg.as_bytes()
    except (ValueError, TypeError, IndexError) as e:  # the email package's verdict on a value
        raise BadRequest(Reply(501, "5.5.4", f"bad message field: {e}"[:200])) from None
    return Submission(sender, [*to_rcpts, *cc_rcpts, *bcc_rcpts], data, [*to_refused, *cc_refused, *bcc_refused])


def _json_sender(value: str) -> str:
    """The envelope sender of the JSON form: the first address of ``from``. Never the null sender, which
    an empty address would be to the submitter: ``from`` names the author, and "<>" is nobody."""
    sender = next((a for _, a in header_addresses([value]) if a), "")
    if not sender:
        raise BadRequest(FROM_REQUIRED)
    return sender


class ApiServer:
    def __init__(self, context: ApiContext, *, header_timeout: float = HEADER_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.context = context
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None
        # Slow or idle heads and clients that stop reading are closed (the request body has its own
        # bound, limits.data_timeout, in post_message).
        self.guard = HttpGuard("api", header_timeout=header_timeout, write_timeout=write_timeout)

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None, max_body: int) -> None:
        app = web.Application(client_max_size=max_body, middlewares=[self.guard.middleware, json_errors])
        app.router.add_post("/v1/messages", self.post_message)
        # auto_decompress off: aiohttp drops the connection without a reply on a compressed body that
        # ends early; Content-Encoding is refused in _read instead.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0,
                                     auto_decompress=False)
        await self._runner.setup()
        self.bound = await self.guard.start(self._runner, host, port, tls=tls,
                                            tls_handshake_timeout=self.context.cfg.limits.tls_handshake_timeout)

    async def stop(self) -> None:
        if self._runner is not None:
            self.guard.close()
            await self._runner.cleanup()
            await self.guard.wait_closed()
            self._runner = None

    async def post_message(self, request: web.Request) -> web.Response:
        ctx = self.context
        auths = request.headers.getall("Authorization", [])
        # Exactly one: given two, a proxy in front of us and we could each pick a different one.
        scheme, _, token = auths[0].partition(" ") if len(auths) == 1 else ("", "", "")
        if scheme.lower() != "bearer" or not token.strip():
            return error_response(AUTH_REQUIRED, 401)
        user = ctx.keys.get(api_key_hash(token.strip()))
        if user is None or ctx.submitter is None:
            log.info("api.auth_failed", peer=request.remote)
            return error_response(AUTH_INVALID, 401)
        try:
            # The same bound as an SMTP DATA phase: a client that trickles its body must not hold
            # the request (and its memory) for as long as it likes.
            async with asyncio.timeout(ctx.cfg.limits.data_timeout):
                sub = await self._read(request, ctx)
        except TimeoutError:
            log.info("api.body_timeout", peer=request.remote, timeout=ctx.cfg.limits.data_timeout)
            resp = error_response(BODY_TIMEOUT, 408)
            resp.force_close()  # the rest of the body is never read
            return resp
        except BadRequest as e:
            return error_response(e.reply)
        except web.HTTPRequestEntityTooLarge:
            return error_response(TOO_BIG, 413)
        tls = "HTTPS" if request.secure else None
        try:
            res = await ctx.submitter.submit(user, sub.mail_from, sub.recipients, sub.data,
                                             peer_ip=request.remote or "unknown", tls=tls, refused=sub.refused)
        except (MessageRefused, SpoolError, DkimSignError) as e:
            r = reply_for(e)
            log.info("api.refused", user=user.name, reply=str(r), mail_from=sub.mail_from,
                     rcpts=len(sub.recipients) + len(sub.refused))
            return error_response(r)
        metrics.API_REQUESTS.labels("202").inc()
        return web.json_response(
            {"queue_id": res.queue_id,
             "rejected": [{"recipient": x.recipient, "code": x.reply.code, "enhanced": x.reply.enhanced,
                           "message": x.reply.text} for x in res.refused]},
            status=202)

    async def _read(self, request: web.Request, ctx: ApiContext) -> Submission:
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise BadRequest(NOT_IDENTITY)
        ctype = request.content_type
        if ctype == "message/rfc822":
            raw = to_crlf(await request.read())
            q = request.query
            tos = [t.strip() for v in q.getall("to", []) for t in v.split(",") if t.strip()]
            try:
                p = prepare(raw, recipients=tos, extract=not tos, sender=q.get("from") or None, full_name=None,
                            domain=ctx.cfg.server.hostname, default_sender=None)
            except PrepareError as e:
                no_rcpt = e.exit_code == EX_NOUSER
                raise BadRequest(Reply(554, "5.5.1", str(e)) if no_rcpt else Reply(550, "5.6.0", str(e))) from None
            return Submission(p.mail_from, list(p.recipients), p.data)
        if ctype == "application/json":
            try:
                doc = await request.json(loads=_loads)
            except DuplicateKeyError as e:
                raise BadRequest(Reply(501, "5.5.4", str(e)[:200])) from None
            except LookupError:  # the Content-Type's charset
                raise BadRequest(Reply(554, "5.6.1", f"unknown charset {request.charset!r}"[:200])) from None
            except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deep
                raise BadRequest(Reply(501, "5.5.4", "body is not valid JSON")) from None
            return build_json_message(doc)
        raise BadRequest(BAD_TYPE)
