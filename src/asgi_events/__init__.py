"""asgi-events: per-user real-time events over WebSocket for any ASGI app."""

from .errors import AsgiEventsError, BackendUnavailableError, InvalidEventError
from .history import History
from .history_http import history_app
from .hooks import ConnectionInfo, current_connection
from .hub import EventHub
from .middleware import EventsMiddleware
from .request import HandshakeRequest
from .types import Principal

__version__ = "0.1.0"

__all__ = (
    "AsgiEventsError",
    "BackendUnavailableError",
    "ConnectionInfo",
    "EventHub",
    "EventsMiddleware",
    "HandshakeRequest",
    "History",
    "InvalidEventError",
    "Principal",
    "__version__",
    "current_connection",
    "history_app",
)
