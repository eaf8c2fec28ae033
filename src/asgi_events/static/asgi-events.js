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
 *   token        the credential; tokenIn: "subprotocol" (default: offered as
 *                "asgi-events.token.<token>", kept out of URLs and logs) or "query" (?token=)
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
 *   onStatus(status, detail)  "connecting" {attempt}, "open", "closed" {code, reason, retryIn}
 *                   (a retry is scheduled), "paused", "stopped" {code, reason} (a final close,
 *                   see below) or {error}
 *   refreshToken({code, reason})  on 4001, or 1008 "Authentication failed": a fresh token (or a
 *                                 promise of one) to reconnect
 *                   with; null/undefined (or no hook) stops the client
 *   ping         ms between "ping" keepalives (0: none, the default); with it, a socket that
 *                hears nothing for two intervals is dropped and reconnected
 *   backoff      {initial: 500, max: 30000}: ms, exponential with full jitter, reset on ready
 *
 * Always offers "asgi-events.v1" (control messages). Ids already delivered are dropped if they
 * ever come again. Close codes (the close table of protocol.py):
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
const RETRY = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014, 4002]);
// Any other code, but an auth one, is final: 1000, 4003 "Disconnected" (hub.disconnect), ...
// 1008 is also "Too many connections" and "Rate limit exceeded": only its auth reason refreshes.
const isAuth = (code, reason) => code === 4001 || (code === 1008 && reason === "Authentication failed");
const SEEN = 1024; // delivered ids remembered, to never deliver one twice

export class EventsClient {
  constructor(options = {}) {
    this.options = { tokenIn: "subprotocol", ping: 0, ...options };
    this.url = toWs(options.url ?? import.meta.url.replace(/\/client\.js([?#].*)?$/, ""));
    this.token = options.token ?? null;
    this.position = options.lastEventId ?? null; // the id we are current up to
    this.status = "idle";
    this.ws = null;
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
    const url = new URL(this.url);
    const protocols = [V1];
    if (this.token != null && this.options.tokenIn === "query") {
      url.searchParams.set("token", this.token);
    } else if (this.token != null) {
      protocols.push(`asgi-events.token.${this.token}`);
    }
    const since = this.options.lastEventTs;
    if (this.position != null) url.searchParams.set("lastEventId", this.position);
    else if (since != null) url.searchParams.set("lastEventTs", since.toISOString?.() ?? since);
    this._status("connecting", { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(url, protocols);
    } catch (error) {
      return this._stop("stopped", { error }); // e.g. a token that is no valid subprotocol
    }
    this.ws = ws;
    this.replaying = true;
    this.heard = Date.now();
    ws.onopen = () => ws === this.ws && this._opened(ws);
    ws.onmessage = (message) => ws === this.ws && this._message(message.data);
    ws.onclose = (event) => ws === this.ws && this._closed(event.code, event.reason);
  }

  _opened(ws) {
    this._status("open");
    if (this.options.ping > 0) {
      this.pinger = setInterval(() => {
        if (Date.now() - this.heard > 2 * this.options.ping) this._closed(1006, "No pong");
        else ws.send("ping");
      }, this.options.ping);
    }
  }

  _message(data) {
    this.heard = Date.now();
    if (data === "pong") return;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    if (event?.type === "asgi_events.ready") {
      const ready = event.payload;
      this.replaying = false;
      this.attempt = 0;
      if (ready.position != null) this.position = ready.position;
      this.options.onReady?.(ready);
      if (!ready.recovered) this.options.onGap?.(ready);
      return;
    }
    if (event?.id != null) {
      if (this.seen.has(event.id)) return;
      this.seen.add(event.id);
      if (this.seen.size > SEEN) this.seen.delete(this.seen.values().next().value);
      this.position = event.id;
    }
    this.options.onEvent?.(event, { replayed: this.replaying });
  }

  async _closed(code, reason) {
    this._halt();
    if (isAuth(code, reason)) {
      const fresh = await this.options.refreshToken?.({ code, reason });
      if (!this.wanted) return; // paused or closed meanwhile
      if (fresh == null) return this._stop("stopped", { code, reason });
      this.token = fresh;
    } else if (!RETRY.has(code)) {
      return this._stop("stopped", { code, reason });
    }
    const { initial = 500, max = 30000 } = this.options.backoff ?? {};
    const retryIn = Math.random() * Math.min(max, initial * 2 ** this.attempt++);
    this._status("closed", { code, reason, retryIn });
    this.timer = setTimeout(() => this._open(), retryIn);
  }

  /** Drop the socket and the timers (the socket's late events are ignored). */
  _halt() {
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState < WebSocket.CLOSING) ws.close(1000);
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
