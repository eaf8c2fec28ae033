"""asgi-events: per-user real-time events over WebSocket for any ASGI app."""

from .errors import AsgiEventsError, BackendUnavailableError, InvalidEventError
from .hub import EventHub
from .middleware import EventsMiddleware
from .types import Principal

__version__ = "0.1.0"

__all__ = (
    "AsgiEventsError",
    "BackendUnavailableError",
    "EventHub",
    "EventsMiddleware",
    "InvalidEventError",
    "Principal",
    "__version__",
)
