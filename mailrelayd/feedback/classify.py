"""Hard/soft classification of one delivery failure.

:func:`classify_status` is the single rule set used for asynchronous bounces (DSN fields or
the text of a non-standard bounce) and for the synchronous 5xx/4xx replies our own delivery
attempts receive. Its contract, from the suppression policy:

* **hard_bounce** (the address gets suppressed) only when the failure says the *address
  itself* is permanently unusable: the mailbox or the domain does not exist (RFC 3463
  X.1.1, X.1.2, X.1.3, X.1.10 and X.4.4 with a 5 class), the account is disabled or suspended,
  the mailbox has moved, the domain accepts no mail (RFC 7505 null MX);
* **soft_bounce** for everything else, even with a 5xx code: failures about the sender, the
  message (size, content, spam, virus, authentication), the sending host's IP or reputation,
  policy, rate limits, the recipient's capacity (mailbox full) or the network, and every
  transient (4.x.x / 4xx) failure.

The diagnostic text outranks the codes: many MTAs send ``550 5.0.0 User unknown``, others
send ``550 5.1.1`` with a text that blames the sending IP or a full mailbox. Text is checked
in three tiers: strong soft signals (they name a cause that is not the address: a full
mailbox, a block list, spam, DMARC, the sender...), then the hard signals, then weak soft
signals (policy, refused, timed out...). Only if no text rule matches are the enhanced status
code (RFC 3463) and then the basic reply code (RFC 5321 section 4.2.3) used. With no evidence
at all the answer is soft: a wrong soft costs one more attempt, a wrong hard loses a recipient.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

HARD = "hard_bounce"
SOFT = "soft_bounce"
# Failures about the *sender* (our IP, our domain, our content, our rate), not the recipient:
# they are counted per sending domain and destination, never toward a recipient's suppression.
REPUTATION = "reputation"
POLICY = "policy"
NOT_ABOUT_RECIPIENT = frozenset({REPUTATION, POLICY})
# Blocklists, reputation, PTR, SPF/DKIM/DMARC (X.7.23-X.7.27): the sending host or domain.
REPUTATION_REASONS = frozenset({"blocked", "badreputation", "requireptr", "authfailure"})
# Content, spam, rate limits, sender address, relaying, protocol: what or how we sent.
POLICY_REASONS = frozenset({
    "spamdetected", "virusdetected", "speeding", "toomanyconn", "rejected", "norelaying", "policyviolation",
    "securityerror", "contenterror", "notcompliantrfc", "syntaxerror", "failedstarttls",
})

_MAX_TEXT = 4000
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]\d)")
_URL = re.compile(r"(?:https?|ftp)://\S{0,500}|www\.\S{0,500}")
# A URL that points at a DNS block list or a sender-reputation service is the refusal's reason, often
# the only one ("553 http://www.spamhaus.org/query/bl?ip=192.0.2.1"): it reads as "blocklist" before
# the other URLs are dropped. Hosts of the common lists and reputation lookups (Spamhaus, SpamCop,
# Barracuda, SORBS, Validity Sender Score, Cisco SenderBase/Talos, Mailspike, UCEPROTECT, CBL at
# abuseat.org, SURBL/URIBL, SpamRATS, Invaluement, Proofpoint's IP check, Microsoft's sender support
# and delisting pages), and any list named as such in a URL.
_REPUTATION_URL = re.compile(
    r"spamhaus\.|spamcop\.|barracudacentral\.|barracudanetworks\.com/reputation|sorbs\.net|senderscore\.|"
    r"senderbase\.|talosintelligence\.|mailspike\.|uceprotect\.|abuseat\.org|[/.]cbl\.|surbl\.|uribl\.|"
    r"spamrats\.|invaluement\.|ipcheck\.proofpoint\.|sendersupport\.olc\.protection\.outlook\.|"
    r"sender\.office\.com|(?:black|block|deny)[-_]?list|dnsbl|[/.=]rbl\b"
)
# RFC 3464 address types and MIME type names: "Final-Recipient: rfc822; a@b" (DSN fields read as text
# when the Diagnostic-Code says nothing), "message/rfc822". They name a format, not a failure.
_TYPE_TOKEN = re.compile(r"\b(?:rfc ?822|utf-8) ?;|\b(?:message|text)/(?:rfc822|global)(?:-headers?)?\b")
_EMAIL = re.compile(r"[^\s<>()\[\]\"',;:]{1,64}@[a-z0-9.-]{1,255}")
_REPLY = re.compile(r"(?<![\d.#-])([245])([0-5])(\d)(?=[ -]|$)")


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives))


# An address the text names between its words, as it reads once ``_EMAIL`` replaced it: bare, or in
# the brackets or quotes servers put around it ("Rcpt <<addr>> does not exist", "User [<addr>]").
_ADDR_REF = r"[<\[(\"']?<addr>[>\])\"']?"
# "does not accept mail", "is not accepting e-mail", "accepts no mail": alone, the destination takes
# no mail at all (RFC 7505 null MX, RFC 3463 X.1.10); with a qualifier after it ("with attachments",
# "from your domain", "larger than 10 MB") a refusal of this message or this sender only.
_NOT_ACCEPT = r"(not accept(ing)?|accepts? no) (any )?(e-?)?mails?"
# Chinese has no spaces: a clause (from a blank or punctuation on) whose words before the subject do
# not name the sender (发件人/發件人/寄件者 "sender", 发信 "sending"): "發件人帳號不存在" is about us.
# Full-width punctuation is ASCII by then (NFKC, see _classify).
_CJK_NOT_SENDER = r"(?:^|[\s。,:;])(?:(?!发件|發件|寄件|发信|發信|寄信)[^\s。,:;]){0,8}?"


# Tier 1: the failure names a cause other than the address. Checked before the hard rules
# because such texts often also say "recipient rejected" or carry a 5.1.1 code.
_STRONG_SOFT: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mailboxfull", _rx(
        r"mail[- ]?box (is |was )?(full|over|exceeded)",
        r"mail[- ]?box (size )?(limit )?(was |is |has )?(exceeds|exceeded)", r"over ?quota",
        r"quota (is )?(exceeded|full)",
        r"exceed\w* (the |his |her |their |its )?(\w+ )?(storage |disk )?quota",
        r"insufficient (disk |storage )?space",
        r"disk quota", r"storage (space|limit|quota)", r"mail[- ]?box size limit", r"mail ?folder is full",
        r"too much mail", r"full mail[- ]?box", r"(account|inbox|mail[- ]?box|recipient|user) is full",
        r"is over (the |their |his |her )?(\w+ )?(quota|limit)", r"quota exceeded", r"out of storage",
        r"mailbox has exceeded", r"user.{0,20}over.{0,10}(quota|limit)",
        # Japanese: the mailbox is full / over its capacity (容量).
        r"(メールボックス|受信箱|受信フォルダ)[^。\n]{0,20}(容量|満杯|一杯|いっぱい)", r"満杯",
        r"容量(が|を)?(超過|オーバー|一杯|いっぱい)",
        # Spanish, Portuguese, Italian, French, German, Dutch: the mailbox is full.
        r"buz[oó]n (de correo )?(est[aá] )?lleno", r"casilla (de correo )?(est[aá] )?llena",
        r"caixa (postal|de correio|de entrada) (est[aá] )?(cheia|lotada)", r"casella (di posta )?(è )?piena",
        r"bo[iî]te (aux lettres |de r[eé]ception )?(est )?pleine", r"postfach (ist )?voll",
        r"mailbox (is )?vol\b", r"cuota excedida", r"quota (excedid[ao]|superata|d[eé]pass[eé]e|[uü]berschritten)",
        # Chinese (simplified and traditional) and Korean: the mailbox is full or out of space.
        r"(邮箱|郵箱|信箱|邮件箱|收件箱|收件匣)[^。\n,]{0,8}(已满|已滿|空间不足|空間不足|容量不足|超过容量|超出容量|超過容量)",
        r"(사서함|메일함|편지함)[^.\n]{0,10}(가득|용량 초과|용량이 초과)",
    )),
    ("exceedlimit", _rx(
        r"(message|mail|e-?mail) (size )?(is |was )?too (big|large)",
        r"(message|mail|e-?mail) (is |was )?(larger|bigger) than",
        # The size limit named before or after the verb: "max message size exceeded", "size limit
        # exceeded", "exceeded the maximum message size", "exceeds the allowed size".
        r"(max(imum)? )?(message |mail |e-?mail )?size (limit )?(was |has been |is )?exceeded",
        r"exceed(s|ed|ing)? (the )?(fixed |maximum |max |allowed |permitted )?(message |mail |e-?mail )?size",
        rf"{_NOT_ACCEPT} (larger|bigger|greater|over|above|exceeding|of more than)\b",
        r"message size exceeds", r"size limit", r"message length exceeds", r"too large for",
        r"(メッセージ|メール)(の)?サイズ[^。\n]{0,20}(超え|超過|大きすぎ)",
    )),
    ("speeding", _rx(
        r"too many (connections|recipients|messages|concurrent|mails|emails|sessions)",
        r"rate ?limit", r"rate.{0,20}(exceeded|too high)", r"receiving mail at a rate",
        r"(cannot|can't|can ?not) (receive|accept) any more (e-?mails?|messages?|mail)",
        r"(daily|hourly) (sending |receiving |message |mail )?(limit|quota)",
        r"sending (too fast|at a rate)",
        r"throttl", r"has sent to too many", r"connection rate", r"too fast", r"frequency limit",
    )),
    ("blocked", _rx(
        r"blocked using", r"black ?list", r"block ?list", r"deny ?list", r"spamhaus", r"spamcop", r"sorbs",
        r"\bdnsbl\b", r"\brbl\b", r"(?<!not )listed (in|on|at|by)", r"reputation", r"client host",
        r"client ip",
        r"\bip (address )?.{0,30}(rejected|blocked|denied|refused|not allowed|listed|banned)",
        r"(your|sending|sender|client|connecting) (ip|host|server|mta)", r"not accepting connections",
        r"reverse dns", r"\bptr\b", r"\brdns\b", r"reverse (dns|lookup|hostname)", r"dynamic ip", r"dial-?up",
        r"sender ip", r"not (be )?(permitted|allowed) to send", r"without a valid sender",
        r"envelope blocked", r"\bhelo\b", r"\behlo\b",
        # qmail's "Connected to 192.0.2.1 but my name was rejected." (our HELO name, whatever the
        # reply says: "501 5.0.0 Invalid domain name" is about us) and "... but greeting failed."
        r"my name was rejected", r"but greeting failed",
        # Yahoo/AOL deferrals about the sender's traffic ("[TSS04] ... unexpected volume or user complaints").
        r"\[ts[0-9]{2}\]", r"unexpected volume", r"(user|recipient|subscriber) complaints",
        r"(from|of) (this|your|the sending) ip", r"traffic not accepted",
    )),
    ("spamdetected", _rx(
        r"spam", r"\bube\b", r"bulk (e-?mail|mail)", r"junk mail", r"content (was )?rejected",
        r"message content", r"unsolicited", r"suspicious", r"phish",
    )),
    ("virusdetected", _rx(r"virus", r"malware", r"infected", r"malicious")),
    ("authfailure", _rx(
        r"dmarc", r"\bspf\b", r"\bdkim\b", r"unauthenticated (e-?mail|sender|message)",
        r"authentication (required|failed|results|is required)", r"auth ?required", r"not authenticated",
        r"must authenticate", r"unauthenticated senders", r"authentication checks? failed",
        r"authentication fail", r"turn on smtp auth",
    )),
    ("rejected", _rx(
        # Also with the address between the words ("sender <addr> not found"): the sender's address
        # is no recipient's (the address-level rules below would read "... does not exist" as one).
        rf"(sender('s)? (e-?mail )?(address |domain |mail[- ]?box |account )?|return (e-?mail )?address )"
        rf"({_ADDR_REF} )?(is |was )?"
        r"(does not exist|doesn't exist|did not exist|rejected|denied|verify failed|unknown|is not|"
        r"blocked|invalid|not found|could(n't| not) be (found|verified))",
        # Japanese: the sender (送信者, 差出人, 送信元) address or domain refused or unknown.
        r"(送信者|差出人|送信元)[^。\n]{0,20}(拒否|見つかりません|存在しません|不正|無効)",
        r"domain of sender", r"sender domain", r"mail from.{0,60}(rejected|refused|denied|not accepted)",
        # Sender verification (Exim's callout: "550-Verification failed for <our return path>" ...
        # "550 Sender verify failed"): the receiver could not reach *our* address, whatever Status
        # the reporting MTA wrote for the recipient.
        r"sender verif(y|ication)", r"verification failed for",
        r"(could not|couldn't|unable to|cannot|can't) verify (the )?sender",
        rf"mail from:? ?{_ADDR_REF},? (does not|doesn't|did not) exist", rf"{_NOT_ACCEPT} from\b",
        # RFC 7505 section 4.2: the *sender's* domain has a null MX ("550 5.7.27 Sender address has null MX").
        rf"sender('s)? (e-?mail )?(address |domain )?({_ADDR_REF} |[a-z0-9.-]{{1,253}} )?(has|with|uses) (a )?null ?mx",
        r"sender.{0,20}not (allowed|permitted|accepted)", r"invalid sender", r"bad sender", r"from address",
        r"purported responsible", r"return.?path", r"envelope.?from", r"reverse.?path", r"senders? (is )?not",
        r"you are not (allowed|permitted|authorized)", r"are not me", r"from: header", r"from header",
        r"not (a )?member", r"only (members|subscribers)", r"permission to post", r"moderator",
        r"not authorized to (send|post)", r"doesn't have permission", r"(after|in reply to) mail from",
        # Japanese: no permission (権限) to post or send (Google Groups' "you may not have permission to
        # post messages to the group").
        r"(投稿|送信)(する)?(ための)?権限(が|は)?(ない|ありません|無い)",
    )),
    ("norelaying", _rx(
        r"relay(ing)? (access )?(denied|not permitted|not allowed|prohibited)",
        r"not (configured|permitted|allowed) to relay",
        r"unable to relay", r"we do not relay", r"relay (is )?not", r"cannot relay", r"no relaying",
    )),
    ("policyviolation", _rx(
        r"\bpolicy (violation|rejection|reasons?)\b",
        # Mail of some content refused ("not accepting mail with attachments or embedded images").
        rf"{_NOT_ACCEPT} (with|containing|including|having|(that|which) (has|have|contains?|includes?|"
        r"carr(y|ies))|of (this |that )?type|attachments?|images?|links?)\b",
        r"(violat\w*|against|due to|by|per) "
        r"(our |local |the |site |security |content |organi[sz]ation(al)? )?polic(y|ies)",
        r"(local|security|content|site|anti-?spam|organi[sz]ation(al)?) polic(y|ies)",
    )),
    ("filtered", _rx(
        r"recipient preferences", r"refused by (the )?recipient", r"recipient.{0,20}filter", r"filtered",
    )),
    ("mesgtoobig", _rx(r"headers too large", r"too many headers")),
    ("notcompliantrfc", _rx(
        r"rfc ?(5322|2822|822|5321|2821)", r"duplicate header", r"multiple .{0,20}addresses in from",
        r"not (rfc )?compliant", r"malformed (header|message)", r"header error", r"invalid header",
    )),
    ("expired", _rx(
        r"temporar", r"try (again )?later", r"retry (later|timeout)", r"delayed", r"deferred",
        r"not found, try again",
    )),
)

# Tier 2: the address itself is unusable. Hard when the failure is permanent.
_HARD: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hasmoved", _rx(
        r"has moved", r"recipient no longer on server", r"no longer (with|at|on|here|works)",
        r"not our (user|customer)",
        r"user not local", r"address has changed", r"changed (his|her|their) (e-?mail )?address",
    )),
    ("suspend", _rx(
        r"(account|mail[- ]?box|user|address|recipient|e-?mail)( account)? (has been |is |was )?"
        r"(disabled|deactivated|suspended|inactive|locked|closed|terminated|discontinued|frozen|cancell?ed|deleted|removed|expired)",
        r"compte du destinataire est bloque", r"inactive (e-?mail|account|user|mail[- ]?box|address)",
        r"(disabled|suspended|deactivated|closed|terminated|expired) (account|mail[- ]?box|user|address)",
        r"account (is )?(no longer|not) (active|available|in use)",
        # Spanish, Portuguese, Italian, French, German: the account or mailbox is disabled or expired.
        r"(cuenta|casilla|buz[oó]n|conta|caixa postal|casella|account|compte|konto|postfach)( de correo| di posta)?"
        r" (ha sido |ha |est[aá] |foi |[eè] (stat[ao] )?|a [eé]t[eé] |est |ist |wurde )?"
        r"(deshabilitad[ao]|desactivad[ao]|suspendid[ao]|expirad[ao]|inactiv[ao]|bloquead[ao]|cancelad[ao]|"
        r"desativad[ao]|suspens[ao]|disabilitat[ao]|disattivat[ao]|sospes[ao]|scadut[ao]|d[eé]sactiv[eé]e?|"
        r"suspendue?|expir[eé]e?|deaktiviert|gesperrt|abgelaufen)",
        # Chinese and Korean: the account or mailbox is frozen, disabled, closed or dormant.
        _CJK_NOT_SENDER + r"(帐号|账号|帳號|帐户|账户|帳戶|邮箱|郵箱|信箱)[^。\n,]{0,6}"
        r"(冻结|凍結|停用|禁用|注销|註銷|锁定|鎖定|暂停使用|暫停使用)",
        r"(계정|메일함|사서함)[^.\n]{0,10}(정지|휴면|비활성)",
    )),
    ("notaccept", _rx(
        r"does not accept (any )?(e-?)?mail", r"not accept(ing)? (any )?(e-?)?mail", r"null ?mx",
        r"accepts no mail",
        r"no mail (is )?accepted", r"does not receive (any )?(e-?)?mail",
        # RFC 7505 null MX in the words of the MTA that looked it up: Exim's "an MX or SRV record
        # indicated no SMTP service" (Postfix's "(nullMX)" and "Domain ... has null MX" above).
        r"(mx|srv)( or (mx|srv))? records? (indicated|indicates|says|shows) no smtp service",
        r"not accepting (any )?network messages",  # RFC 3463 X.3.2's wording
    )),
    ("hostunknown", _rx(
        r"host (or domain name )?not found", r"domain (name )?not found", r"no such (domain|host)",
        r"unknown (domain|host)",
        r"domain (does not|doesn't|did not) exist", r"invalid domain", r"host ?unknown",
        r"name service error",
        r"nxdomain", r"domain.{0,20}(is )?not (valid|reachable|resolvable)", r"unrouteable (mail )?domain",
        r"no (valid )?mx", r"mx (record )?not found",
        r"domain .{0,40}could(n't| not) be found", r"couldn't find.{0,20}domain",
        r"bad destination (system|host)", r"domain name service", r"unknown mail domain",
        r"name or service not known",  # getaddrinfo's EAI_NONAME for the recipient's host (Postfix)
        r"(couldn't|could not|can't|cannot|unable to) find (a |any )?(mail exchanger|mx|host|domain)",
        # The host named between the words ("DNS lookup failure: host mx.example not found", DragonFly).
        r"\bhost \[?[a-z0-9][a-z0-9.-]{0,252}\]? not found",
        # Japanese: the domain or host does not exist / is not found.
        r"(ドメイン|ホスト)[^。\n]{0,30}(見つかりません|存在しません)", r"ドメイン(が)?不明",
        # Spanish, Portuguese, Italian, French, German: the domain does not exist.
        r"(dominio|dom[ií]nio|domaine) (inexistente|inesistente|inexistant|desconocido|desconhecido|sconosciuto|"
        r"inconnu)",
        r"(el dominio|o dom[ií]nio|il dominio|le domaine|die domain) (no existe|n[aã]o existe|non esiste|"
        r"n'existe pas|existiert nicht)",
        r"unbekannte domain",
    )),
    ("userunknown", _rx(
        r"user ?unknown", r"unknown (user|recipient|address|mail[- ]?box|local.?part|account|alias|e-?mail)",
        r"no such (user|recipient|mail[- ]?box|address|account|local user|person|alias|e-?mail)",
        # The address may stand between the words: "554 Rcpt <a@b> does not exist", "550 User [a@b]
        # does not exist" (a sender's is a tier 1 cause).
        r"(user|rcpt|recipient|mail[- ]?box|address|account|addressee|e-?mail|local.?part|alias)"
        rf"( address| account| name)?( {_ADDR_REF})?"
        r"( that you tried to reach)? (does not|doesn't|did not|do not|not) exist",
        r"(user|rcpt|recipient|mail[- ]?box|address|account|addressee|alias)( address| account| name)?"
        rf"( {_ADDR_REF})? (was |is )?(not found|unknown|invalid|not listed|not valid|not recognized)",
        r"invalid (final )?(delivery )?(recipient|mail[- ]?box|user|userid|address|destination|e-?mail|account)",
        r"recipient address rejected: access denied",  # Microsoft 365 directory-based edge blocking
        r"check (if|that|whether) (the )?(e-?mail )?address is (correct|valid)",
        r"not a valid (mail[- ]?box|user|recipient|address)", r"no mail[- ]?box", r"no such mail[- ]?box",
        r"mail[- ]?box (not found|unavailable|does not exist|is unavailable|invalid|not available)",
        r"unrouteable address", r"unknown or illegal alias",
        r"(is|was) not (a )?(known|valid) (user|recipient)",
        r"(don'?t|doesn'?t|does not) have an? .{0,40}account", r"no account", r"bad destination mail[- ]?box",
        r"user not found", r"recipient ?not ?found", r"recip ?not ?found", r"addressee unknown",
        r"destination address.{0,20}(invalid|unknown)", r"adresse destinataire invalide", r"not a known user",
        r"user (account )?(is )?unavailable", r"no longer (valid|exists?|available|active|in use)",
        r"invalid address", r"address (is )?invalid", r"unknown address", r"address unknown",
        r"email account that you tried to reach", r"no valid recipients", r"user doesn't exist",
        r"mailbox name not allowed", r"recipient (is )?unknown",
        r"not listed in (the )?\w+ (directory|address)",
        r"no one here by that name", r"no mailbox here by that name", r"unknown in (virtual|local|relay)",
        r"non-?existent (user|recipient|mail[- ]?box|address|account)",
        # Spanish, Portuguese, Italian, French, German, Dutch: unknown user, recipient or address.
        r"(usuario|usu[aá]rio|destinatario|destinat[aá]rio|utente|utilisateur|destinataire|empf[aä]nger|"
        r"benutzer|gebruiker|ontvanger) (desconocido|desconhecido|sconosciuto|inconnu|unbekannt|onbekend|"
        r"inexistente|inesistente|inexistant)",
        r"(unbekannter|onbekende) (empf[aä]nger|benutzer|gebruiker|ontvanger)",
        r"(direcci[oó]n|endere[cç]o|indirizzo|adresse|buz[oó]n|casilla|casella|cuenta|conta|compte|postfach)"
        r"( de correo| di posta| de e-?mail| electr[oó]nico)? (inexistente|inesistente|inexistante|"
        r"desconocid[ao]|desconhecid[ao]|sconosciut[ao]|inconnue?|unbekannt)",
        r"(el usuario|la cuenta|la direcci[oó]n|el buz[oó]n|la casilla|o usu[aá]rio|a conta|o endere[cç]o|"
        r"l'utente|l'indirizzo|la casella|l'utilisateur|l'adresse|la bo[iî]te|der benutzer|die adresse|"
        r"das postfach|der empf[aä]nger)( de correo| di posta| aux lettres)? (no existe|n[aã]o existe|non esiste|"
        r"n'existe pas|existiert nicht)",
        # Chinese (simplified and traditional) and Korean: the user, mailbox or address does not exist
        # (not the sender's: 发件人, 寄件者).
        _CJK_NOT_SENDER + r"(用户|用戶|收件人|收信人|邮箱|郵箱|信箱|邮件地址|郵件地址|帐号|账号|帳號|帐户|账户|帳戶)"
        r"(名)?[^。\n,]{0,8}(不存在|无效|無效|未找到|找不到)",
        r"존재하지 않는 (사용자|계정|메일 ?주소|주소|수신자|아이디|메일 ?계정)",
        r"(사용자|계정|수신자|아이디)(를|을)? 찾을 수 없",

        r"(isn't|is not) a valid (user|recipient|address)",
        r"invalid mailbox", r"err\.nosuchuser", r"nosuchuser",
        # "the address couldn't be found" (Gmail / Google Workspace "Address not found", Microsoft
        # 365 "The email address you entered couldn't be found"); the sender's is a tier 1 cause.
        r"(address|recipient|mail[- ]?box|account)( you entered| you specified)? (couldn't|could not|can't|cannot|"
        r"can not) be found",
        r"bad (destination )?(mail[- ]?box )?address syntax",
        # Japanese: the user / address / mailbox is not found, does not exist, unknown (Domino
        # "ユーザー X は Domino ディレクトリには見つかりません", carriers' "宛先不明").
        r"(ユーザ|ユーザー|利用者|受信者|宛先|あて先|アドレス|アカウント|メールボックス|ディレクトリ)[^。\n]{0,60}"
        r"(見つかりません|存在しません)",
        r"宛先不明", r"(ユーザ|ユーザー)(が)?(不明|存在しない)",
        r"存在しない(ユーザ|ユーザー|アドレス|メールアドレス|宛先|アカウント)",
    )),
)

# RFC 5321's stock 550 text ("Requested action not taken: mailbox unavailable") is also the
# wording of many policy refusals; with a policy word beside it, the address is not the cause.
_GENERIC_UNAVAILABLE = re.compile(r"(mail[- ]?box|user)( is)? (unavailable|not available)")
_POLICY_WORD = re.compile(r"\b(polic(y|ies)|blocked|banned|prohibited|not allowed|denied|refused)\b")

# Weak causes that contradict an address-level Status the reporting MTA filled in.
_NOT_ADDRESS_WEAK = frozenset({"networkerror", "syntaxerror", "systemerror", "mailererror", "expired",
                               "policyviolation"})

# Tier 3: generic soft causes, only when nothing above matched.
_WEAK_SOFT: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mailererror", _rx(
        r"command output", r"exit (status|code)", r"mailer error", r"procmail", r"\bx-unix\b", r"pipe to",
    )),
    ("syntaxerror", _rx(
        r"command (not recognized|unrecognized)", r"improper sequence", r"bad sequence", r"syntax error",
        r"command parameter", r"parameter not implemented", r"unrecognized command",
    )),
    ("expired", _rx(
        r"timed? ?out", r"time ?out", r"retry time", r"delivery time expired", r"giving up", r"expired",
        r"could not be delivered (for|within|in)", r"have not been able to deliver",
        r"not yet been delivered",
        r"still being retried", r"queue", r"unable to deliver .{0,20}(after|for|within)",
    )),
    ("networkerror", _rx(
        r"connection (refused|reset|lost|closed|dropped)", r"could not connect", r"unable to connect",
        r"no route",
        r"network (is )?unreachable", r"too many hops", r"mail loop", r"loops? back", r"dns (failure|error)",
        r"lost connection", r"connect to", r"hop count", r"unable to (resolve|route)", r"lookup failed",
        r"not reachable", r"unreachable",
    )),
    ("policyviolation", _rx(r"policy", r"prohibited", r"not allowed", r"forbidden", r"violation")),
    ("systemerror", _rx(
        r"system error", r"internal error", r"local error", r"transaction failed",
        r"service (is )?(currently )?(unavailable|not available)",
        r"server error", r"system (is )?(busy|not available)", r"i/o error", r"out of memory", r"system full",
    )),
    ("blocked", _rx(r"refused", r"denied", r"blocked", r"rejected", r"not accepted")),
)

# RFC 3463 section 3: subject.detail → reason, for permanent (5.x.x) codes. Only the address
# status codes that mean "this address cannot receive mail" are hard.
_HARD_CODES = {
    (1, 0): "userunknown",
    (1, 1): "userunknown",
    (1, 2): "hostunknown",
    (1, 3): "userunknown",
    (1, 6): "hasmoved",
    (1, 10): "notaccept",
    (4, 4): "hostunknown",
    (7, 13): "suspend",  # RFC 3463 registry (RFC 5248): "User Account Disabled"
}
_SOFT_CODES = {
    (1, 7): "rejected",
    (1, 8): "rejected",
    (2, 0): "filtered",
    (2, 1): "filtered",
    (2, 2): "mailboxfull",
    (2, 3): "exceedlimit",
    (2, 4): "systemerror",
    (3, 0): "systemerror",
    (3, 1): "systemfull",
    (3, 2): "systemerror",
    (3, 4): "mesgtoobig",
    (3, 5): "systemerror",
    (4, 0): "networkerror",
    (4, 1): "networkerror",
    (4, 2): "networkerror",
    (4, 3): "networkerror",
    (4, 5): "toomanyconn",
    (4, 6): "networkerror",
    (4, 7): "expired",
    (5, 3): "toomanyconn",
    (5, 4): "syntaxerror",
    (6, 0): "contenterror",
    (7, 1): "securityerror",
    (7, 7): "securityerror",
    (7, 20): "authfailure",
    (7, 21): "authfailure",
    (7, 22): "authfailure",
    (7, 23): "authfailure",
    (7, 24): "authfailure",
    (7, 25): "requireptr",
    (7, 26): "authfailure",
    (7, 27): "authfailure",  # X.7.27: the *sender* domain has a null MX (RFC 7505 section 4.2)
    (7, 28): "spamdetected",  # X.7.28: mail flood detected
}


def _enhanced(text: str) -> tuple[int, int, int] | None:
    match = _ENHANCED.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _reason_from_code(code: tuple[int, int, int]) -> tuple[bool, str]:
    """(address-level?, reason) for an enhanced status code."""
    subject_detail = (code[1], code[2])
    if subject_detail in _HARD_CODES:
        return True, _HARD_CODES[subject_detail]
    if subject_detail in _SOFT_CODES:
        return False, _SOFT_CODES[subject_detail]
    by_subject = {1: "userunknown", 2: "filtered", 3: "systemerror", 4: "networkerror", 5: "syntaxerror",
                  6: "contenterror", 7: "policyviolation"}
    # X.1.x codes not in the tables (5.1.4 ambiguous, 5.1.5, 5.1.9...) say nothing definite.
    return False, "onhold" if code[1] == 1 else by_subject.get(code[1], "onhold")


def _match(rules: tuple[tuple[str, re.Pattern[str]], ...], text: str) -> str:
    for reason, pattern in rules:
        if pattern.search(text):
            return reason
    return ""


@dataclass(frozen=True)
class Classification:
    """The outcome of :func:`classify_failure`: kind, reason and what decided it.

    ``kind`` is ``hard_bounce`` (the address is unusable), ``soft_bounce`` (a failure about
    the recipient that may pass), or ``reputation`` / ``policy`` (the failure is about the
    sender: see :data:`REPUTATION_REASONS` and :data:`POLICY_REASONS`).
    ``evidence`` is ``"soft-text"`` (a non-address cause named in the text), ``"hard-text"``
    (the text says the address is unusable), ``"code"`` (an enhanced or basic status code),
    ``"weak-text"`` (generic words such as "refused" or "policy") or ``"none"``.
    """

    kind: str
    reason: str
    evidence: str

    @property
    def decisive(self) -> bool:
        """True when the text itself named the cause (strong soft or hard wording)."""
        return self.evidence in ("soft-text", "hard-text")


def bucket(kind: str, reason: str, evidence: str = "") -> str:
    """Move a soft failure whose reason is about the sender into ``reputation`` or ``policy``.

    Generic refusal words ("rejected", "denied": weak evidence) are ``policy``: they may be about
    either side, and a vague refusal must not count toward a recipient's suppression either.
    """
    if kind != SOFT:
        return kind
    if reason in REPUTATION_REASONS:
        return POLICY if evidence == "weak-text" else REPUTATION
    if reason in POLICY_REASONS:
        return POLICY
    return kind


def classify_status(status: str, diagnostic: str, *, smtp_code: int | None = None) -> tuple[str, str]:
    """Classify one failed recipient as ``(kind, reason)``.

    ``kind`` is ``"hard_bounce"``, ``"soft_bounce"``, ``"reputation"`` or ``"policy"`` (see
    :class:`Classification`). ``status`` is the RFC 3463 enhanced status code reported for the
    recipient (``"5.1.1"``, possibly with a comment, or ``""``); ``diagnostic`` the remote
    server's text (a DSN ``Diagnostic-Code``, the lines of a plain-text bounce about this
    recipient, or the reply our own delivery attempt received, e.g. ``"550 5.1.1 <x@y>:
    Recipient address rejected: User unknown"``); ``smtp_code`` the basic reply code when the
    caller has it separately.

    ``reason`` uses sisimai's vocabulary (``userunknown``, ``hostunknown``, ``suspend``,
    ``hasmoved``, ``notaccept``, ``mailboxfull``, ``blocked``, ``spamdetected``, ``expired``,
    ...; ``onhold`` when nothing says why). Never raises.
    """
    result = classify_failure(status, diagnostic, smtp_code=smtp_code)
    return result.kind, result.reason


def classify_failure(
    status: str, diagnostic: str, *, smtp_code: int | None = None, final: bool = False
) -> Classification:
    """Like :func:`classify_status`, also telling which evidence decided (see :class:`Classification`).

    ``final``: the reporting MTA gave up on the recipient (DSN ``Action: failed``, RFC 3464
    section 2.3.3). A ``4.x.x`` status then only says the MTA's last attempt was transient;
    when the text says the address does not exist, that is the verdict.
    """
    result = _classify(status, diagnostic, smtp_code, final)
    kind = bucket(result.kind, result.reason, result.evidence)
    return result if kind == result.kind else Classification(kind, result.reason, result.evidence)


def _classify(status: str, diagnostic: str, smtp_code: int | None, final: bool) -> Classification:
    # URLs carry no reason but do carry words ("https://.../#filtered", "...?ip=1.2.3.4");
    # addresses neither ("filtered@example.com").
    # A block list's URL is the reason, though ("553 http://www.spamhaus.org/query/bl?ip=...").
    text = str(diagnostic or "")[:_MAX_TEXT].lower()
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)  # half-width katakana, full-width digits
    text = _URL.sub(lambda m: " blocklist " if _REPUTATION_URL.search(m.group(0)) else " ", text)
    text = _TYPE_TOKEN.sub(" ", text)
    text = " ".join(_EMAIL.sub("<addr>", text).split())
    status_code = _enhanced(str(status or ""))
    text_code = _enhanced(text)
    reply = smtp_code
    if reply is None:
        match = _REPLY.search(text)
        reply = int(match.group(0)) if match else None

    # Permanence: the reported status class wins (RFC 3464 section 2.3.4), then codes in the
    # text. A permanent code quoted from the remote server outranks a generic 4.x.x the
    # reporting MTA filled in after giving up.
    if status_code is not None:
        permanent = status_code[0] == 5 or (
            final and ((text_code is not None and text_code[0] == 5) or (reply is not None and reply >= 500))
        )
    elif text_code is not None:
        permanent = text_code[0] == 5
    elif reply is not None:
        permanent = reply >= 500
    else:
        permanent = True  # a failure report without any code ("Delivery failed: user unknown")
    if status_code is not None and status_code[0] == 2:
        return Classification(SOFT, "delivered", "code")

    reason = _match(_STRONG_SOFT, text)
    if reason:
        return Classification(SOFT, reason, "soft-text")
    reason = _match(_HARD, text)
    if reason:
        # "User unknown" in a final failure whose only code is a transient one: the address
        # does not exist (Postfix "450 4.1.1 unverified address ... User unknown", then expiry).
        if reason == "userunknown" and _POLICY_WORD.search(text) and _GENERIC_UNAVAILABLE.search(text) and \
                _match(_HARD, _GENERIC_UNAVAILABLE.sub(" ", text)) != "userunknown":
            return Classification(SOFT, "policyviolation", "soft-text")
        if final and reason in ("userunknown", "hostunknown", "suspend"):
            permanent = True
        return Classification(HARD if permanent else SOFT, reason, "hard-text")

    # A code quoted from the remote server is more specific than a generic Status the
    # reporting MTA filled in (Status: 5.0.0, "550 5.1.1 ..."). An address-level code outranks
    # the generic words below ("Recipient rejected", "denied").
    # X.1.3 (bad destination address syntax) in the Status only, with no code of the remote's own:
    # Sendmail writes 5.1.3 for any bare 553 reply, whatever the refusal was. No evidence either way.
    if status_code is not None and status_code[1:] == (1, 3) and text_code is None:
        status_code = None
    codes = [c for c in (text_code, status_code) if c is not None and (c[1], c[2]) != (0, 0)]
    weak = _match(_WEAK_SOFT, text)
    if permanent:
        for code in codes:
            if code[0] == 5:
                address_level, reason = _reason_from_code(code)
                # Only the reporting MTA's Status names the address, while the remote server's own
                # words name a network, protocol or system failure ("Connection timed out", "503
                # Improper sequence of commands"): the Status was filled in, the text is what happened.
                if address_level and code is status_code and text_code is None and weak in _NOT_ADDRESS_WEAK:
                    break
                if address_level:
                    return Classification(HARD, reason, "code")
                break
    reason = weak
    if reason:
        return Classification(SOFT, reason, "weak-text")
    for code in codes:
        return Classification(SOFT, _reason_from_code(code)[1], "code")
    if reply == 551 and permanent:
        return Classification(HARD, "hasmoved", "code")  # RFC 5321 section 3.4: "User not local"
    if reply in (521, 556) and permanent:
        # RFC 7504: 521 "host does not accept mail", 556 "domain does not accept mail" (null MX).
        return Classification(HARD, "notaccept", "code")
    return Classification(SOFT, "onhold" if permanent else "expired", "none")
