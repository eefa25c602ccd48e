"""Failed AUTH usernames never reach the log in clear (mailrelayd.smtp.auth.username_for_log): AUTH LOGIN
prompts for the username and the password separately, and people type the password first."""

from __future__ import annotations

from mailrelayd.smtp.auth import Authenticator, username_for_log
from mailrelayd.users import User
from tests.conftest import TEST_HASH

PASSWORD = b"Tr0ub4dor&3-hunter2"


def test_unknown_username_is_a_keyed_hash_with_its_length() -> None:
    shown = username_for_log(PASSWORD, {"alice"})
    assert PASSWORD.decode() not in shown
    assert PASSWORD.decode()[:4] not in shown  # not a truncation either
    assert shown.startswith("unknown:") and shown.endswith(f":len={len(PASSWORD)}")
    # Stable within the process, so repeats can be correlated; different inputs differ.
    assert username_for_log(PASSWORD) == shown
    assert username_for_log(PASSWORD + b"!") != shown


def test_configured_user_is_shown_by_name() -> None:
    auth = Authenticator({"alice": User("alice", TEST_HASH, ("@example.com",))})
    assert auth.username_for_log(b"alice") == "alice"
    assert auth.username_for_log(b"Alice").startswith("unknown:")  # names are exact, as verify() sees them
    assert auth.username_for_log(b"\xff\xfe").startswith("unknown:")
