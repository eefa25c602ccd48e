"""mailrelayd: an asyncio SMTP relay daemon."""

__version__ = "0.1.0"
