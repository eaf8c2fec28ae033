/**
 * asgi-events browser client: a dependency-free ES module, served by the middleware next to
 * its socket at `<path>/client.js` (e.g. `/ws/client.js`).
 *
 *   import { connect } from "/ws/client.js";
 *   const events = connect({
 *     token: "...",
 *     onEvent(event, { replayed }) { ... },  // each event once, in order
 *     onGap(ready) { ... },                  // events were lost: refetch your state
 *   });
 *   events.pause(); events.resume(); events.close();
 *
 * Options (all optional):
 *   url          the socket, ws(s):// or http(s)://; default: this module's URL without
 *                "/client.js" (so a page importing /ws/client.js connects to /ws)
 *   transport    "websocket" (the default), "sse" or "auto" (see Transports below)
 *   token        the credential; tokenIn: "subprotocol" (default: offered as
 *                "asgi-events.token.<token>", kept out of URLs and logs) or "query" (?token=).
 *                Over SSE it is always sent as ?token= (see Transports)
 *   withCredentials  SSE only: send cookies to a server of another origin (EventSource's option)
 *   lastEventId  where the first connection resumes from (later ones resume from the position)
 *   lastEventTs  without lastEventId: replay the events newer than this (Date or ISO string)
 *   onEvent(event, {replayed})  every event with an id at most once; `replayed` before the
 *                   ready message. Events without an id never move the position and are not
 *                   deduped: transient ones, and latest values (`event.latest === true`: the
 *                   newest value of each key of the hub's latest_types, sent on each connection
 *                   after its replay and before the ready message, so `replayed` is true)
 *   onReady(ready)  after each connection's replay: {position, recovered, replayed, reason?, oldest?}
 *   onGap(ready)    the same, when `recovered` is false (reason "evicted", "expired", "epoch"
 *                   or "unknown"; `oldest` is the oldest id resumable now)
 *   onStatus(status, detail)  "connecting" {attempt, transport}, "open" {transport},
 *                   "closed" {code, reason, retryIn} (a retry is scheduled), "paused",
 *                   "stopped" {code, reason} (a final close, see below) or {error}
 *   refreshToken({code, reason})  on 4001, or 1008 "Authentication failed" (over SSE: an HTTP
 *                   refusal, reported as 401 "Refused"): a fresh token (or a promise of one) to
 *                   reconnect with; null/undefined (or no hook) stops the client
 *   ping         WebSocket only: ms between "ping" keepalives (0: none, the default); with it,
 *                a socket that hears nothing for two intervals is dropped and reconnected
 *   batch        WebSocket only: offer "asgi-events.v1.batch" first (default true), so that a
 *                burst arrives as a few frames, each a JSON array of messages; false offers
 *                only "asgi-events.v1" (one message a frame). Either way the callbacks see the
 *                same messages in the same order
 *   backoff      {initial: 500, max: 30000}: ms, exponential with full jitter, reset on ready
 *
 * Transports (`client.transport` is the one in use, "websocket" or "sse"):
 *   websocket  one WebSocket. It offers "asgi-events.v1.batch", then "asgi-events.v1" (both
 *              with control messages; `batch: false` offers only the second), and then the
 *              token subprotocol if the token goes there. The server picks the batch one when
 *              it knows it; `client.protocol` is the one it picked. On a batch socket a frame
 *              that is a JSON array is a list of messages, handled one by one in order (any
 *              other frame, such as the plain text "pong", is one message, as on v1).
 *   sse        Server-Sent Events: the browser's EventSource on the same URL, as http(s)://.
 *              EventSource cannot send headers, so the token goes in the query (?token=),
 *              whatever tokenIn says, and URLs end up in proxy and server access logs. Where
 *              that matters, pass no token and authenticate by a cookie instead (the hub's
 *              `authenticate`), with the middleware's allowed_origins set. The client manages
 *              reconnects itself, as for the socket (same backoff, same callbacks, resuming
 *              with ?lastEventId=<position>): the browser's own reconnect is cut short, so that
 *              a fresh token can go in the URL, the close codes below are followed, and every
 *              retry is reported. The server's close codes arrive as "asgi_events.close"
 *              events; a stream refused with an HTTP status (the server's are 401 for a token
 *              and 403 for an Origin; EventSource does not say which) counts as 401 "Refused"
 *              (refreshToken, else stopped), and a stream that drops as 1006.
 *   auto       a WebSocket, falling back to SSE at once when it fails before it opened and no
 *              connection has opened yet (a proxy that strips upgrades): until one opens, each
 *              attempt tries the socket first. Once a WebSocket has opened it never falls back;
 *              once an event stream has opened it stays on SSE.
 *
 * Ids already delivered are dropped if they ever come again. Close codes (the close table of
 * protocol.py):
 *   1001, 1005, 1006, 1011, 1012, 1013, 1014, 4002: reconnect after the backoff, resuming with
 *         lastEventId (onStatus "closed")
 *   4001, 1008 "Authentication failed": refreshToken, then reconnect; no token: final
 *   1000: the server is done with this client: final
 *   4003: the application disconnected this user (logout): final
 *   any other (1008 "Too many connections" or "Rate limit exceeded", 1009, other 4xxx such
 *         as a code of the application's own from hub.disconnect): final
 * A final close stops the client and reports it: onStatus("stopped", {code, reason}), and no
 * reconnection. After a stop, resume() starts again (set `client.token` first if need be);
 * close() is final.
 */

const V1 = "asgi-events.v1";
const BATCH = "asgi-events.v1.batch"; // frames are JSON arrays of messages
const TOKEN_PREFIX = "asgi-events.token."; // a token offered as a subprotocol, never echoed
const READY = "asgi_events.ready"; // (an SSE event name, and the type of its data)
const CLOSE = "asgi_events.close"; // SSE: why the server ends a stream, {code, reason}
const TRANSPORTS = ["websocket", "sse", "auto"];
const RETRY = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014, 4002]);
// Any other code, but an auth one, is final: 1000, 4003 "Disconnected" (hub.disconnect), ...
// 1008 is also "Too many connections" and "Rate limit exceeded": only its auth reason refreshes.
const isAuth = (code, reason) => code === 4001 || (code === 1008 && reason === "Authentication failed");
const SEEN = 1024; // delivered ids remembered, to never deliver one twice

export class EventsClient {
  constructor(options = {}) {
    this.options = {
      tokenIn: "subprotocol", ping: 0, transport: "websocket", batch: true, ...options,
    };
    if (!TRANSPORTS.includes(this.options.transport)) {
      throw new TypeError(`transport must be one of ${TRANSPORTS.join(", ")}`);
    }
    this.url = toWs(options.url ?? import.meta.url.replace(/\/client\.js([?#].*)?$/, ""));
    this.token = options.token ?? null;
    this.position = options.lastEventId ?? null; // the id we are current up to
    this.status = "idle";
    this.transport = this.options.transport === "sse" ? "sse" : "websocket"; // the next one
    this.ws = null;
    this.es = null;
    this.protocol = null; // the subprotocol the socket opened with ("": none; null: SSE)
    this.opened = false; // whether the current connection opened
    this.firstOpened = null; // the transport of the first connection that opened ("auto")
    this.wanted = false;
    this.closed = false;
    this.attempt = 0;
    this.seen = new Set();
  }

  /** Connect (again), now. */
  resume() {
    if (this.closed) return this;
    this._halt();
    this.wanted = true;
    this.attempt = 0;
    this._firstTry();
    this._open();
    return this;
  }

  /** Cut the connection until resume(); events meanwhile are replayed on resume. */
  pause() {
    if (!this.closed) this._stop("paused");
  }

  /** Close for good. */
  close() {
    this.closed = true;
    this._stop("stopped");
  }

  _open() {
    this.opened = false;
    this.replaying = true;
    if (this.transport === "sse") return this._openEvents();
    const url = new URL(this.url);
    const protocols = this.options.batch === false ? [V1] : [BATCH, V1];
    if (this.token != null && this.options.tokenIn === "query") {
      url.searchParams.set("token", this.token);
    } else if (this.token != null) {
      protocols.push(`${TOKEN_PREFIX}${this.token}`);
    }
    this._resumeFrom(url);
    this._status("connecting", { attempt: this.attempt, transport: "websocket" });
    let ws;
    try {
      ws = new WebSocket(url, protocols);
    } catch (error) {
      return this._stop("stopped", { error }); // e.g. a token that is no valid subprotocol
    }
    this.ws = ws;
    this.heard = Date.now();
    ws.onopen = () => ws === this.ws && this._opened(ws);
    ws.onmessage = (message) => ws === this.ws && this._frame(ws, message.data);
    ws.onclose = (event) => ws === this.ws && this._socketClosed(event.code, event.reason);
  }

  _openEvents() {
    const url = new URL(this.url);
    url.protocol = url.protocol.replace(/^ws/, "http");
    if (this.token != null) url.searchParams.set("token", this.token); // no headers: see above
    this._resumeFrom(url);
    this._status("connecting", { attempt: this.attempt, transport: "sse" });
    let es;
    try {
      es = new EventSource(url.href, { withCredentials: Boolean(this.options.withCredentials) });
    } catch (error) {
      return this._stop("stopped", { error });
    }
    this.es = es;
    es.onopen = () => es === this.es && this._opened(null);
    es.onmessage = (message) => es === this.es && this._message(message.data);
    es.addEventListener(READY, (message) => es === this.es && this._message(message.data));
    es.addEventListener(CLOSE, (message) => es === this.es && this._closeEvent(message.data));
    es.onerror = () => es === this.es && this._eventsFailed(es);
  }

  /** Where the next connection resumes from: the position, else lastEventTs. */
  _resumeFrom(url) {
    const since = this.options.lastEventTs;
    if (this.position != null) url.searchParams.set("lastEventId", this.position);
    else if (since != null) url.searchParams.set("lastEventTs", since.toISOString?.() ?? since);
  }

  _opened(ws) {
    this.opened = true;
    this.firstOpened ??= this.transport;
    this.protocol = ws ? ws.protocol : null;
    this._status("open", { transport: this.transport, protocol: this.protocol });
    if (ws && this.options.ping > 0) {
      this.pinger = setInterval(() => {
        if (Date.now() - this.heard > 2 * this.options.ping) this._closed(1006, "No pong");
        else ws.send("ping");
      }, this.options.ping);
    }
  }

  /** One WebSocket frame: on a batch socket a JSON array is several messages, in order. */
  _frame(ws, data) {
    if (ws.protocol !== BATCH) return this._message(data);
    this.heard = Date.now();
    if (data === "pong") return;
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      return;
    }
    if (!Array.isArray(parsed)) return this._handle(parsed);
    for (const event of parsed) {
      if (ws !== this.ws) return; // a callback paused or closed the client: drop the rest
      this._handle(event);
    }
  }

  /** One frame of one message (an SSE message, or a WebSocket frame off the batch protocol). */
  _message(data) {
    this.heard = Date.now();
    if (data === "pong") return;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    this._handle(event);
  }

  _handle(event) {
    if (event === null || typeof event !== "object" || Array.isArray(event)) return; // not one
    if (event.type === READY) {
      const ready = event.payload;
      this.replaying = false;
      this.attempt = 0;
      if (ready.position != null) this.position = ready.position;
      this.options.onReady?.(ready);
      if (!ready.recovered) this.options.onGap?.(ready);
      return;
    }
    if (event.id != null) {
      if (this.seen.has(event.id)) return;
      this.seen.add(event.id);
      if (this.seen.size > SEEN) this.seen.delete(this.seen.values().next().value);
      this.position = event.id;
    }
    this.options.onEvent?.(event, { replayed: this.replaying });
  }

  _socketClosed(code, reason) {
    if (this.options.transport === "auto" && !this.opened && this.firstOpened == null) {
      // The upgrade failed, and no connection has ever opened: perhaps a proxy that strips
      // upgrades. The same attempt over SSE, at once.
      this._halt();
      this._status("closed", { code, reason, retryIn: 0 });
      this.transport = "sse";
      return this._open();
    }
    this._closed(code, reason);
  }

  _closeEvent(data) {
    let close;
    try {
      close = JSON.parse(data);
    } catch {
      close = {};
    }
    this._closed(close?.code ?? 1005, close?.reason ?? "");
  }

  _eventsFailed(es) {
    // CLOSED: answered with an error status (or no event stream); the browser gives up.
    if (es.readyState === EventSource.CLOSED && !this.opened) this._closed(401, "Refused", true);
    // Else the stream dropped or could not be made: the browser would retry; the backoff does.
    else this._closed(1006, "");
  }

  async _closed(code, reason, refresh = isAuth(code, reason)) {
    this._halt();
    if (refresh) {
      const fresh = await this.options.refreshToken?.({ code, reason });
      if (!this.wanted) return; // paused or closed meanwhile
      if (fresh == null) return this._stop("stopped", { code, reason });
      this.token = fresh;
    } else if (!RETRY.has(code)) {
      return this._stop("stopped", { code, reason });
    }
    this._firstTry();
    const { initial = 500, max = 30000 } = this.options.backoff ?? {};
    const retryIn = Math.random() * Math.min(max, initial * 2 ** this.attempt++);
    this._status("closed", { code, reason, retryIn });
    this.timer = setTimeout(() => this._open(), retryIn);
  }

  /** "auto": until a connection has opened, every attempt tries the socket first. */
  _firstTry() {
    if (this.options.transport === "auto" && this.firstOpened == null) this.transport = "websocket";
  }

  /** Drop the connection and the timers (its late events are ignored). */
  _halt() {
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    const { ws, es } = this;
    this.ws = this.es = null;
    if (ws && ws.readyState < WebSocket.CLOSING) ws.close(1000);
    es?.close(); // (before the browser's own reconnect)
  }

  _stop(status, detail = {}) {
    this.wanted = false;
    this._halt();
    this._status(status, detail);
  }

  _status(status, detail = {}) {
    this.status = status;
    this.options.onStatus?.(status, detail);
  }
}

/** A started EventsClient: `connect(options)` is `new EventsClient(options).resume()`. */
export function connect(options) {
  return new EventsClient(options).resume();
}

function toWs(url) {
  const absolute = new URL(url, globalThis.location?.href);
  absolute.protocol = absolute.protocol.replace(/^http/, "ws");
  return absolute.href;
}
