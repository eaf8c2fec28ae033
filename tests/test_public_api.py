from __future__ import annotations

import inspect

import asgi_events


def test_all_is_exactly_the_public_names() -> None:
    public = {name for name in vars(asgi_events) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(asgi_events, name))}
    assert set(asgi_events.__all__) == (public - modules) | {"__version__"}
    assert isinstance(asgi_events.__all__, tuple)


def test_public_api_names_and_defaults_of_the_contract() -> None:
    params = inspect.signature(asgi_events.EventHub).parameters
    defaults = {name: p.default for name, p in params.items() if name != "verify_token"}
    assert next(iter(params)) == "verify_token"
    assert defaults["transient_types"] == ("JOB_PROGRESS", "CUSTOMER_UPDATE_PROGRESS")
    assert (defaults["buffer_size"], defaults["buffer_max_age"]) == (200, 300.0)
    assert defaults["on_client_message"] is None and defaults["backend"] is None
    middleware = inspect.signature(asgi_events.EventsMiddleware).parameters
    assert middleware["path"].default == "/ws" and "hub" in middleware
    for method in ("broadcast", "broadcast_to_all", "shutdown", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(asgi_events.EventHub, method))
        assert getattr(asgi_events.EventHub, method).__doc__
