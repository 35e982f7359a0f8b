"""The one framed protocol spoken client↔supervisor and supervisor↔agent (stdlib only)."""

from .channel import ChannelClosed, FramedChannel
from .codec import (
    CHUNK_SIZE,
    MAX_HEADER,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    ProtocolError,
)

__all__ = [
    "CHUNK_SIZE",
    "MAX_HEADER",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "ChannelClosed",
    "Frame",
    "FrameDecoder",
    "FramedChannel",
    "ProtocolError",
]
