// asgi-events browser client: placeholder, replaced by the real module.
export {};
