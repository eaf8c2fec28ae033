/* fanload: the fan-out benchmark's compiled WebSocket load client (benchmarks/README.md).
 *
 * One thread, epoll, level-triggered. Opens N WebSockets to 127.0.0.1 (client i to
 * PORTS[i % len(PORTS)], GET /ws?token=user-i, at most 64 handshakes at a time), then reads
 * every socket as fast as frames arrive and checks each event as fanbench's Python clients do:
 * per socket, every seq once and in order; per new event, the latency (receive time minus the
 * event's "t", both CLOCK_REALTIME ns, as time.time_ns()).
 *
 *   fanload [--deflate] PORTS SOCKETS EVENTS plain|batch [SUBPROTOCOL]
 *
 * With SUBPROTOCOL the client offers it and fails unless the server selects it. "batch": every
 * text message is a JSON array of messages (asgi-events.v1.batch).
 *
 * --deflate: offer permessage-deflate as Chromium does (RFC 7692), exactly
 * "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits". If the server accepts
 * (its answer is parsed: server_no_context_takeover, client_no_context_takeover,
 * server_max_window_bits, client_max_window_bits; anything else fails the client), every message
 * with RSV1 set is inflated (raw inflate, the server's window, 0x00 0x00 0xff 0xff appended;
 * one inflate stream per socket across messages, reset after each one with
 * server_no_context_takeover) before it is checked. Built with -DFANLOAD_NO_ZLIB (no zlib), the
 * client refuses --deflate. Before "open" the client says what was negotiated:
 * "extensions <sockets that negotiated> <1 if their answers differ, else 0> <first answer or ->".
 *
 * Protocol with the Python side (fanbench/cclient.py): lines on stdout, "open" (all N upgraded),
 * "first" (first new event), "done" (every event on every socket), "error <text>" (then exit 2);
 * on stdin, "stop" answers "result <received> <out_of_order> <duplicates> <unexpected> <frames>
 * <ready> <last_ns> <latencies> <closed> <wire_bytes> <message_bytes> <messages> <compressed>"
 * (wire_bytes: every frame received after the upgrade, headers and payload as received;
 * message_bytes: the data messages' payloads, after inflating; messages: data messages;
 * compressed: those with RSV1) followed by binary (native endianness): the latencies
 * as int64 ns, each socket's received count as uint32, each socket's closed flag as uint8.
 * "close" (or EOF on stdin) sends a close frame (1000) on every open socket and exits.
 *
 * The scanner does not parse JSON. It assumes what the server sends: an event's text holds
 * "payload":{"seq":<digits>,"t":<digits>, with no spaces (json.dumps(separators=(",", ":"))
 * as every variant encodes it); a batch message is an array whose messages each start with
 * {"type":" and our events continue bench.tick","payload":{"seq":...; a string value holding
 * that text would be misread (the pad is "xxx..."). The same assumptions as the regexes of
 * fanbench/common.py (EVENT_FIELDS, BATCH_MESSAGE), with the same results.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#ifndef FANLOAD_NO_ZLIB
#include <zlib.h>
#endif

#define CONCURRENCY 64
#define READ_SIZE 65536
#define MAX_FRAME (64u << 20) /* a frame or message above this fails the client */

enum { CONNECTING, HANDSHAKE, OPEN, CLOSED };

typedef struct {
    int fd, state, port;
    uint8_t *buf; /* bytes read and not yet parsed */
    size_t len, cap;
    uint8_t *msg; /* a fragmented message so far */
    size_t mlen, mcap;
    int in_msg, msg_compressed; /* a fragmented message so far: its first frame had RSV1 */
    uint32_t next_seq, received;
    char accept[29];
    int pmd, pmd_reset; /* permessage-deflate negotiated; server_no_context_takeover */
#ifndef FANLOAD_NO_ZLIB
    z_stream z; /* the inflate stream, initialised once negotiated */
#endif
} conn;

static conn *conns;
static int nsock, nports, ep, batch;
static int *ports;
static uint32_t nevents;
static const char *subprotocol;
static uint8_t *seen; /* nsock x nevents */
static int64_t *lat;
static uint64_t nlat, lat_cap, expected, received, ooo, dups, unexpected, frames, ready;
static int64_t last_ns, now_ns;
static int started, opened, stopped;
static int deflate_offer; /* --deflate */
static uint64_t wire_bytes, message_bytes, messages, compressed, ext_sockets;
static char ext_first[256]; /* the first negotiated Sec-WebSocket-Extensions answer */
static int ext_mixed;       /* a later socket's answer differed from it */

static void say(const char *text) {
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t n = write(1, text + off, len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) exit(3);
        off += (size_t)n;
    }
}

static void die(const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(text, sizeof text - 2, "error ");
    n += vsnprintf(text + n, sizeof text - 2 - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof text - 2) n = (int)sizeof text - 2;
    text[n] = '\n';
    text[n + 1] = 0;
    say(text);
    exit(2);
}

static void put_all(const void *data, size_t len) {
    const uint8_t *p = data;
    while (len) {
        ssize_t n = write(1, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) exit(3);
        p += n;
        len -= (size_t)n;
    }
}

/* -- SHA-1 and base64, for Sec-WebSocket-Accept ------------------------------------------- */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *m = calloc(total, 1);
    if (!m) die("out of memory");
    memcpy(m, data, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 |
                   (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(m);
    for (int i = 0; i < 20; i++) out[i] = (uint8_t)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *in, size_t len, char *out) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[o++] = abc[v >> 18 & 63];
        out[o++] = abc[v >> 12 & 63];
        out[o++] = i + 1 < len ? abc[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? abc[v & 63] : '=';
    }
    out[o] = 0;
}

/* -- sending (client frames are masked; small control frames only) ------------------------ */

static void send_frame(conn *c, int opcode, const uint8_t *payload, size_t len) {
    uint8_t frame[2 + 4 + 125];
    if (len > 125) len = 125;
    frame[0] = (uint8_t)(0x80 | opcode);
    frame[1] = (uint8_t)(0x80 | len);
    uint8_t mask[4];
    if (getrandom(mask, 4, 0) != 4) memset(mask, 0x5a, 4);
    memcpy(frame + 2, mask, 4);
    for (size_t i = 0; i < len; i++) frame[6 + i] = payload[i] ^ mask[i % 4];
    /* Best effort: a socket whose send buffer is full of our own frames is not a case here. */
    ssize_t n = send(c->fd, frame, 6 + len, MSG_NOSIGNAL);
    (void)n;
}

static void close_conn(conn *c) {
    if (c->state == CLOSED) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
}

/* -- checking events ---------------------------------------------------------------------- */

static void event(conn *c, uint64_t seq, int64_t t) {
    if (seq != c->next_seq) ooo++;
    c->next_seq = (uint32_t)(seq + 1);
    size_t i = (size_t)(c - conns);
    if (seq >= nevents || seen[i * nevents + seq]) {
        dups++;
        return;
    }
    seen[i * nevents + seq] = 1;
    if (nlat == lat_cap) {
        lat_cap = lat_cap ? 2 * lat_cap : 1024;
        lat = realloc(lat, lat_cap * sizeof *lat);
        if (!lat) die("out of memory");
    }
    lat[nlat++] = now_ns - t;
    c->received++;
    last_ns = now_ns;
    if (!received++) say("first\n");
    if (received == expected) say("done\n");
}

/* Digits at p (up to end) into *v; returns the position after them, or NULL if none. */
static const uint8_t *digits(const uint8_t *p, const uint8_t *end, uint64_t *v) {
    const uint8_t *start = p;
    uint64_t x = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (p - start < 19) x = x * 10 + (uint64_t)(*p - '0');
        else x = UINT64_MAX; /* absurd: counted as a duplicate (seq) */
        p++;
    }
    *v = x;
    return p == start ? NULL : p;
}

static int starts(const uint8_t *p, const uint8_t *end, const char *lit, size_t n) {
    return (size_t)(end - p) >= n && memcmp(p, lit, n) == 0;
}

#define LIT(s) s, sizeof(s) - 1

/* At p: <seq digits>,"t":<t digits>, -- returns the position after the final comma, or NULL. */
static const uint8_t *seq_t(const uint8_t *p, const uint8_t *end, uint64_t *seq, uint64_t *t) {
    p = digits(p, end, seq);
    if (!p || !starts(p, end, LIT(",\"t\":"))) return NULL;
    p = digits(p + 5, end, t);
    if (!p || p == end || *p != ',') return NULL;
    return p + 1;
}

/* A message of one event (no batching): the first "payload":{"seq":..,"t":.., in it. */
static void plain(conn *c, const uint8_t *p, size_t len) {
    static const char key[] = "\"payload\":{\"seq\":";
    const uint8_t *end = p + len;
    while ((p = memmem(p, (size_t)(end - p), key, sizeof key - 1))) {
        uint64_t seq, t;
        p += sizeof key - 1;
        if (seq_t(p, end, &seq, &t)) {
            frames++;
            event(c, seq, (int64_t)t);
            return;
        }
    }
    unexpected++;
}

/* A batch message: a JSON array; every {"type":" starts a message (ours, the ready, other). */
static void array(conn *c, const uint8_t *p, size_t len) {
    static const char key[] = "{\"type\":\"";
    static const char tick[] = "bench.tick\",\"payload\":{\"seq\":";
    static const char readytype[] = "asgi_events.ready\"";
    const uint8_t *end = p + len;
    uint64_t found = 0, events = 0;
    if (len && *p == '[') {
        while ((p = memmem(p, (size_t)(end - p), key, sizeof key - 1))) {
            uint64_t seq, t;
            const uint8_t *after;
            found++;
            p += sizeof key - 1;
            if (starts(p, end, LIT(tick)) && (after = seq_t(p + sizeof tick - 1, end, &seq, &t))) {
                if (!events++) frames++;
                event(c, seq, (int64_t)t);
                p = after;
            } else if (starts(p, end, LIT(readytype))) {
                ready++;
                p += sizeof readytype - 1;
            } else {
                unexpected++;
            }
        }
    }
    if (!found) unexpected++;
}

static void message(conn *c, const uint8_t *p, size_t len) {
    if (batch) array(c, p, len);
    else plain(c, p, len);
}

/* -- permessage-deflate (RFC 7692) -------------------------------------------------------- */

#ifndef FANLOAD_NO_ZLIB
static uint8_t *inflated; /* one buffer for every socket: a message is checked before the next */
static size_t inflated_cap;

/* Feed `len` bytes at p to c's inflate stream, appending the output to inflated[*out...]. */
static void inflate_some(conn *c, const uint8_t *p, size_t len, size_t *out) {
    z_stream *z = &c->z;
    z->next_in = (Bytef *)p;
    z->avail_in = (uInt)len;
    for (;;) {
        if (inflated_cap - *out < 4096) {
            inflated_cap = inflated_cap ? 2 * inflated_cap : READ_SIZE;
            inflated = realloc(inflated, inflated_cap);
            if (!inflated) die("out of memory");
        }
        z->next_out = inflated + *out;
        z->avail_out = (uInt)(inflated_cap - *out);
        int r = inflate(z, Z_SYNC_FLUSH);
        *out = inflated_cap - z->avail_out;
        if (*out > MAX_FRAME)
            die("socket %zu: inflated message above %u bytes", c - conns, MAX_FRAME);
        if (r == Z_STREAM_END) { /* a block with BFINAL: the next message starts a new stream */
            inflateReset(z);
            return;
        }
        if (r != Z_OK && r != Z_BUF_ERROR)
            die("socket %zu: inflate: %s (%d)", c - conns, z->msg ? z->msg : "error", r);
        if (z->avail_in == 0 && z->avail_out > 0) return; /* all input used, all output out */
    }
}

/* A compressed message: inflated (the 0x00 0x00 0xff 0xff the server stripped put back). */
static const uint8_t *inflate_message(conn *c, const uint8_t *p, size_t len, size_t *out_len) {
    static const uint8_t tail[4] = {0x00, 0x00, 0xff, 0xff};
    size_t out = 0;
    inflate_some(c, p, len, &out);
    inflate_some(c, tail, sizeof tail, &out);
    if (c->pmd_reset) inflateReset(&c->z); /* server_no_context_takeover */
    *out_len = out;
    return inflated;
}
#endif

/* A whole data message, as received (compressed: RSV1 on its first frame). */
static void deliver(conn *c, const uint8_t *p, size_t len, int rsv1) {
    messages++;
    if (rsv1) {
#ifndef FANLOAD_NO_ZLIB
        compressed++;
        p = inflate_message(c, p, len, &len);
#endif
    }
    message_bytes += len;
    message(c, p, len);
}

/* One extension parameter's value (a token or a quoted string), into out; 0 if malformed. */
static int param_value(const char *v, char *out, size_t size) {
    size_t n = strlen(v);
    if (n >= 2 && v[0] == '"' && v[n - 1] == '"') v++, n -= 2;
    if (!n || n >= size) return 0;
    memcpy(out, v, n);
    out[n] = 0;
    return 1;
}

static int window_bits(const char *v) {
    char text[8];
    if (!param_value(v, text, sizeof text)) return 0;
    char *end;
    long bits = strtol(text, &end, 10);
    return *end || bits < 8 || bits > 15 ? 0 : (int)bits;
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t')) *--e = 0;
    return s;
}

/* The server's Sec-WebSocket-Extensions answer (NULL: none) for socket i: what was agreed. A
 * client must fail the connection on an answer it did not offer or cannot honour (RFC 7692). */
static void negotiate(int i, const char *answer) {
    conn *c = &conns[i];
    if (!answer) return;
    if (!deflate_offer)
        die("socket %d: extensions not offered, the server answered: %s", i, answer);
    char text[256];
    snprintf(text, sizeof text, "%s", answer);
    if (strchr(text, ',')) die("socket %d: more than one extension in the answer: %s", i, answer);
    char *save, *name = strtok_r(text, ";", &save);
    if (!name || strcasecmp(trim(name), "permessage-deflate"))
        die("socket %d: an extension that was not offered: %s", i, answer);
    int seen_params = 0, server_bits = 15;
    for (char *param; (param = strtok_r(NULL, ";", &save));) {
        char *eq = strchr(param, '='), *value = NULL;
        if (eq) *eq = 0, value = trim(eq + 1);
        param = trim(param);
        static const char *const known[] = {"server_no_context_takeover",
                                            "client_no_context_takeover",
                                            "server_max_window_bits", "client_max_window_bits"};
        int k = 0;
        while (k < 4 && strcasecmp(param, known[k])) k++;
        if (k == 4 || seen_params & (1 << k))
            die("socket %d: unknown or repeated permessage-deflate parameter %s", i, answer);
        seen_params |= 1 << k;
        if (k < 2 && value) die("socket %d: %s takes no value: %s", i, param, answer);
        if (k >= 2 && (!value || !window_bits(value)))
            die("socket %d: %s needs a value of 8 to 15: %s", i, param, answer);
        if (k == 0) c->pmd_reset = 1;
        if (k == 2) server_bits = window_bits(value);
        /* client_*: how we would compress; this client sends only control frames, which are
         * never compressed. */
    }
#ifdef FANLOAD_NO_ZLIB
    (void)server_bits;
    die("socket %d: permessage-deflate agreed, but this build has no zlib", i);
#else
    /* zlib's raw deflate makes a 9-bit window of 8 (see deflateInit2): inflate with 9 then. */
    if (inflateInit2(&c->z, -(server_bits < 9 ? 9 : server_bits)) != Z_OK)
        die("socket %d: inflateInit2 failed", i);
    c->pmd = 1;
    if (!ext_sockets++) snprintf(ext_first, sizeof ext_first, "%s", answer);
    else if (strcmp(answer, ext_first)) ext_mixed = 1;
#endif
}

/* -- reading frames ----------------------------------------------------------------------- */

static void append_msg(conn *c, const uint8_t *p, size_t len) {
    if (c->mlen + len > MAX_FRAME) die("socket %zu: message above %u bytes", c - conns, MAX_FRAME);
    if (c->mlen + len > c->mcap) {
        c->mcap = (c->mlen + len) * 2;
        c->msg = realloc(c->msg, c->mcap);
        if (!c->msg) die("out of memory");
    }
    memcpy(c->msg + c->mlen, p, len);
    c->mlen += len;
}

/* Parse every whole frame in c->buf; keep the rest. Returns 0 once the socket is closed. */
static int frames_in(conn *c) {
    size_t pos = 0;
    while (c->len - pos >= 2) {
        uint8_t *f = c->buf + pos;
        size_t avail = c->len - pos, header = 2;
        uint64_t length = f[1] & 0x7F;
        if (length == 126) {
            if (avail < 4) break;
            length = (uint64_t)f[2] << 8 | f[3], header = 4;
        } else if (length == 127) {
            if (avail < 10) break;
            length = 0;
            for (int i = 0; i < 8; i++) length = length << 8 | f[2 + i];
            header = 10;
        }
        int masked = f[1] & 0x80;
        if (length > MAX_FRAME) die("socket %zu: frame above %u bytes", c - conns, MAX_FRAME);
        size_t total = header + (masked ? 4 : 0) + (size_t)length;
        if (total > avail) { /* the rest is still to come: make room for all of it */
            if (total > c->cap) {
                memmove(c->buf, f, avail);
                c->len = avail, pos = 0;
                c->cap = total + READ_SIZE;
                c->buf = realloc(c->buf, c->cap);
                if (!c->buf) die("out of memory");
            }
            break;
        }
        uint8_t *payload = f + header + (masked ? 4 : 0);
        if (masked) /* servers do not mask; be lenient */
            for (size_t i = 0; i < length; i++) payload[i] ^= f[header + i % 4];
        int fin = f[0] & 0x80, rsv1 = f[0] & 0x40, opcode = f[0] & 0x0F;
        if (f[0] & 0x30 || (rsv1 && (!c->pmd || opcode == 0x0 || opcode & 0x8)))
            die("socket %zu: reserved bits 0x%02x on a frame of opcode %d (permessage-deflate %s)",
                c - conns, f[0] & 0x70, opcode, c->pmd ? "agreed" : "not agreed");
        pos += total;
        wire_bytes += total;
        if (opcode == 0x1 || opcode == 0x2) {
            if (fin) deliver(c, payload, length, rsv1);
            else {
                c->mlen = 0, c->in_msg = 1, c->msg_compressed = rsv1;
                append_msg(c, payload, length);
            }
        } else if (opcode == 0x0) {
            if (!c->in_msg) {
                unexpected++;
                continue;
            }
            append_msg(c, payload, length);
            if (fin) c->in_msg = 0, deliver(c, c->msg, c->mlen, c->msg_compressed);
        } else if (opcode == 0x8) { /* answer the close handshake, then the socket is done */
            send_frame(c, 0x8, payload, length >= 2 ? 2 : 0);
            close_conn(c);
            return 0;
        } else if (opcode == 0x9) {
            send_frame(c, 0xA, payload, length);
        } /* pong, or a reserved opcode: ignored */
    }
    c->len -= pos;
    if (c->len && pos) memmove(c->buf, c->buf + pos, c->len);
    return 1;
}

/* -- connecting --------------------------------------------------------------------------- */

static void start_connect(int i) {
    conn *c = &conns[i];
    c->port = ports[i % nports];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        die("socket %d: connect: %s", i, strerror(errno));
    c->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

static void send_upgrade(int i) {
    conn *c = &conns[i];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) die("socket %d: connect: %s", i, strerror(err));
    uint8_t raw[16];
    char key[25], request[640], protocol[160] = "";
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) die("getrandom failed");
    base64(raw, sizeof raw, key);
    char keyed[64];
    uint8_t digest[20];
    snprintf(keyed, sizeof keyed, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    sha1((uint8_t *)keyed, strlen(keyed), digest);
    base64(digest, 20, c->accept);
    if (subprotocol) snprintf(protocol, sizeof protocol, "Sec-WebSocket-Protocol: %s\r\n", subprotocol);
    int n = snprintf(request, sizeof request,
                     "GET /ws?token=user-%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s\r\n",
                     i, c->port, key, protocol,
                     deflate_offer ? "Sec-WebSocket-Extensions: permessage-deflate; "
                                     "client_max_window_bits\r\n"
                                   : "");
    /* A fresh socket's send buffer takes a few hundred bytes whole. */
    if (send(c->fd, request, (size_t)n, MSG_NOSIGNAL) != n) die("socket %d: short upgrade write", i);
    c->state = HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* The value of header `name` in the response head (each line ends with CRLF), copied into
 * `out` (trimmed, truncated to size - 1), or NULL. */
static char *header(const char *head, const char *name, char *out, size_t size) {
    size_t n = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        if (strncasecmp(line, name, n) == 0 && line[n] == ':') {
            const char *v = line + n + 1, *e = strstr(v, "\r\n");
            while (*v == ' ' || *v == '\t') v++;
            while (e > v && (e[-1] == ' ' || e[-1] == '\t')) e--;
            size_t len = (size_t)(e - v) < size - 1 ? (size_t)(e - v) : size - 1;
            memcpy(out, v, len);
            out[len] = 0;
            return out;
        }
    }
    return NULL;
}

/* How many header lines named `name` the response head has. */
static int header_lines(const char *head, const char *name) {
    size_t n = strlen(name);
    int count = 0;
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n"))
        count += strncasecmp(line + 2, name, n) == 0 && line[2 + n] == ':';
    return count;
}

/* The response head, once complete: check it, keep what follows (frames) in the buffer. */
static int handshake(int i) {
    conn *c = &conns[i];
    uint8_t *sep = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!sep) {
        if (c->len > 16384) die("socket %d: response head too long", i);
        return 0;
    }
    size_t head_len = (size_t)(sep - c->buf) + 4;
    char *head = malloc(head_len + 1);
    if (!head) die("out of memory");
    memcpy(head, c->buf, head_len - 2); /* keep one CRLF: every header line ends with one */
    head[head_len - 2] = 0;
    char *eol = strstr(head, "\r\n");
    if (!eol || !memmem(head, (size_t)(eol - head), " 101", 4)) {
        if (eol) *eol = 0;
        die("socket %d: upgrade refused: %s", i, head);
    }
    char protocol_value[160], accept_value[64];
    char *protocol = header(head, "sec-websocket-protocol", protocol_value, sizeof protocol_value);
    if (subprotocol && (!protocol || strcmp(protocol, subprotocol)))
        die("socket %d: %s not selected (got %s)", i, subprotocol, protocol ? protocol : "none");
    char *accept = header(head, "sec-websocket-accept", accept_value, sizeof accept_value);
    if (!accept || strcmp(accept, c->accept))
        die("socket %d: bad Sec-WebSocket-Accept %s (want %s)", i, accept ? accept : "none", c->accept);
    /* One extension at most was offered: several header lines would be several answers. */
    if (header_lines(head, "sec-websocket-extensions") > 1)
        die("socket %d: several Sec-WebSocket-Extensions headers in the answer", i);
    char ext_value[256];
    negotiate(i, header(head, "sec-websocket-extensions", ext_value, sizeof ext_value));
    free(head);
    c->len -= head_len;
    memmove(c->buf, c->buf + head_len, c->len);
    c->state = OPEN;
    return 1;
}

/* -- control from the Python side --------------------------------------------------------- */

static void report(void) {
    char line[512];
    uint64_t closed = 0;
    for (int i = 0; i < nsock; i++) closed += conns[i].state == CLOSED;
    snprintf(line, sizeof line, "result %lu %lu %lu %lu %lu %lu %ld %lu %lu %lu %lu %lu %lu\n",
             (unsigned long)received, (unsigned long)ooo, (unsigned long)dups,
             (unsigned long)unexpected, (unsigned long)frames, (unsigned long)ready, (long)last_ns,
             (unsigned long)nlat, (unsigned long)closed, (unsigned long)wire_bytes,
             (unsigned long)message_bytes, (unsigned long)messages, (unsigned long)compressed);
    say(line);
    put_all(lat, nlat * sizeof *lat);
    uint32_t *counts = malloc((size_t)nsock * 4);
    uint8_t *flags = malloc((size_t)nsock);
    if (!counts || !flags) die("out of memory");
    for (int i = 0; i < nsock; i++) counts[i] = conns[i].received, flags[i] = conns[i].state == CLOSED;
    put_all(counts, (size_t)nsock * 4);
    put_all(flags, (size_t)nsock);
    free(counts);
    free(flags);
}

static void finish(void) {
    static const uint8_t normal[2] = {0x03, 0xE8}; /* 1000 */
    for (int i = 0; i < nsock; i++) {
        if (conns[i].state == OPEN) send_frame(&conns[i], 0x8, normal, 2);
        if (conns[i].state != CLOSED) close(conns[i].fd);
    }
    exit(0);
}

static void control(void) {
    static char line[64];
    static size_t len;
    ssize_t n = read(0, line + len, sizeof line - 1 - len);
    if (n <= 0) {
        if (n < 0 && errno == EINTR) return;
        finish(); /* EOF: the Python side is gone or done */
    }
    len += (size_t)n;
    line[len] = 0;
    char *nl;
    while ((nl = strchr(line, '\n'))) {
        *nl = 0;
        if (!strcmp(line, "stop") && !stopped) stopped = 1, report();
        else if (!strcmp(line, "close")) finish();
        len -= (size_t)(nl + 1 - line);
        memmove(line, nl + 1, len + 1);
    }
    if (len == sizeof line - 1) len = 0; /* junk */
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--deflate")) deflate_offer = 1, argv++, argc--;
    if (argc < 5 || argc > 6) {
        fprintf(stderr,
                "usage: fanload [--deflate] PORTS SOCKETS EVENTS plain|batch [SUBPROTOCOL]\n");
        return 64;
    }
#ifdef FANLOAD_NO_ZLIB
    if (deflate_offer) die("--deflate: this build has no zlib (built with -DFANLOAD_NO_ZLIB)");
#endif
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
    ports = calloc(strlen(argv[1]) + 1, sizeof *ports);
    for (char *s = argv[1]; *s;) {
        ports[nports++] = (int)strtol(s, &s, 10);
        if (*s == ',') s++;
        else if (*s) die("bad PORTS %s", argv[1]);
    }
    nsock = atoi(argv[2]);
    nevents = (uint32_t)strtoul(argv[3], NULL, 10);
    batch = !strcmp(argv[4], "batch");
    subprotocol = argc == 6 && *argv[5] ? argv[5] : NULL;
    if (nports < 1 || nsock < 1 || nevents < 1) die("bad arguments");
    expected = (uint64_t)nsock * nevents;
    conns = calloc((size_t)nsock, sizeof *conns);
    seen = calloc((size_t)nsock * nevents, 1);
    lat_cap = expected;
    lat = malloc(lat_cap * sizeof *lat);
    if (!conns || !seen || !lat) die("out of memory");
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    for (; started < nsock && started < CONCURRENCY; started++) start_connect(started);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int k = 0; k < n; k++) {
            uint32_t i = evs[k].data.u32;
            if (i == UINT32_MAX) {
                control();
                continue;
            }
            conn *c = &conns[i];
            if (c->state == CLOSED) continue;
            if (c->state == CONNECTING) {
                if (evs[k].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) send_upgrade((int)i);
                continue;
            }
            if (c->cap - c->len < READ_SIZE / 4) {
                c->cap = c->cap ? c->cap * 2 : READ_SIZE;
                if (c->cap < c->len + READ_SIZE) c->cap = c->len + READ_SIZE;
                c->buf = realloc(c->buf, c->cap);
                if (!c->buf) die("out of memory");
            }
            ssize_t got = read(c->fd, c->buf + c->len, c->cap - c->len);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got <= 0) {
                if (c->state == HANDSHAKE) die("socket %u: closed during the handshake", i);
                close_conn(c); /* the server dropped it */
                continue;
            }
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts); /* every frame in this read arrived by now */
            now_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
            c->len += (size_t)got;
            if (c->state == HANDSHAKE) {
                if (!handshake((int)i)) continue;
                if (++opened == nsock) {
                    char line[320];
                    snprintf(line, sizeof line, "extensions %lu %d %s\n",
                             (unsigned long)ext_sockets, ext_mixed, ext_sockets ? ext_first : "-");
                    say(line);
                    say("open\n");
                }
                if (started < nsock) start_connect(started++);
            }
            frames_in(c);
        }
    }
}
