"""The systemd notification protocol (sd_notify), for `Type=notify` units:
a datagram to $NOTIFY_SOCKET. A no-op when not started by systemd."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), path)
        return True
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
