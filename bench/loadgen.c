/*
 * loadgen — an MQTT load generator for side-by-side broker benchmarks.
 *
 * One thread, one epoll loop, non-blocking sockets.  Every connection keeps an
 * output buffer that is flushed once per loop turn (one write() per connection
 * per turn, however many packets it holds) and an input buffer that keeps the
 * tail of a packet cut between two reads, so the generator costs far less per
 * message than the broker it drives.
 *
 * Layouts (who publishes where, who subscribes to what):
 *   pairs   publisher i -> topic bench/i, subscriber i subscribes bench/i
 *   fanout  every publisher -> bench/0, every subscriber subscribes bench/0
 *   fanin   publisher i -> topic bench/i, every subscriber subscribes bench/+
 *   idle    --conns N connections that only CONNECT and stay (memory per
 *           connection, connection rate)
 *
 * Load:
 *   closed loop (default)  each publisher keeps at most --window messages in
 *                          flight: a message is done when all its subscribers
 *                          received it and, for QoS 1/2, when its PUBACK /
 *                          PUBCOMP arrived too.
 *   open loop (--rate R)   R messages/s in total, paced by a timerfd; message k
 *                          goes out from publisher k mod N at t0 + k/R, so each
 *                          publisher sends at R/N with staggered phases.
 *
 * Payload (>= 16 bytes): CLOCK_MONOTONIC send time in ns (8), publisher index
 * (4), per-publisher sequence number (4), filler.  The subscriber takes the
 * latency at read time and checks per-publisher order.
 *
 * Output: one JSON line on stdout.  Exit status: 0 ok, 1 the run failed
 * (broker closed connections, stopped making progress, ...), 2 usage or
 * connection error.  Every wait is bounded, so a broken broker gives an error,
 * never a hang.
 *
 * Build: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (256 * 1024)
#define OUT_HIGH_WATER (256 * 1024)   /* closed loop: stop generating above this */
#define OUT_OPEN_CAP (8 * 1024 * 1024) /* open loop: skip messages above this */
#define MAX_CPU_PIDS 16
#define PAYLOAD_HEADER 16

enum layout { L_PAIRS, L_FANOUT, L_FANIN, L_IDLE };
enum role { R_PUB, R_SUB, R_IDLE };
enum cstate { C_CONNECTING, C_WAIT_CONNACK, C_WAIT_SUBACK, C_READY, C_CLOSED };
enum phase { P_SETUP, P_WARMUP, P_MEASURE, P_DRAIN, P_DONE };

/* ------------------------------------------------------------------ options */

static struct {
    const char *host;
    int port;
    enum layout layout;
    int pubs, subs, conns;
    int qos;
    int payload;
    int window;
    double rate;
    double duration, warmup, drain;
    double connect_timeout, stall_timeout, hold;
    int tick_us;
    int keepalive;
    int mqtt_version; /* 4 = 3.1.1, 5 = 5.0 */
    int connect_concurrency;
    int max_inflight; /* open loop, QoS >= 1 */
    int refill;       /* closed loop: free credit needed before publishing again, -1 = window/4 */
    int persistent_subs; /* subscribers keep a session (clean session 0): QoS >= 1 goes through the broker's store */
    const char *label;
    int cpu_pids[MAX_CPU_PIDS];
    int n_cpu_pids;
} opt = {
    .host = "127.0.0.1", .port = 1883, .layout = L_PAIRS, .pubs = 10, .subs = -1,
    .conns = 1000, .qos = 0, .payload = 64, .window = 100, .rate = 0, .duration = 5,
    .warmup = 1, .drain = 3, .connect_timeout = 20, .stall_timeout = 5, .hold = 2,
    .tick_us = 100, .keepalive = 60, .mqtt_version = 4, .connect_concurrency = 50,
    .max_inflight = 1000, .refill = -1, .label = "",
};

/* ------------------------------------------------------------------ time */

static inline uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ histogram
 * Log-linear buckets like HdrHistogram: values below 64 ns are exact, above
 * that each power of two is split into 64 buckets (about 1.6 % precision). */

#define HIST_SUB 64
#define HIST_BUCKETS (HIST_SUB * 42)
static uint64_t hist[HIST_BUCKETS];
static uint64_t hist_count, hist_max;
static double hist_sum;

static inline int hist_index(uint64_t v)
{
    if (v < HIST_SUB)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6; /* (v >> shift) is in [64, 128) */
    int idx = HIST_SUB + shift * HIST_SUB + (int)((v >> shift) - HIST_SUB);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static uint64_t hist_value(int idx) /* middle of the bucket */
{
    if (idx < HIST_SUB)
        return (uint64_t)idx;
    int shift = (idx - HIST_SUB) / HIST_SUB;
    uint64_t mant = (uint64_t)((idx - HIST_SUB) % HIST_SUB) + HIST_SUB;
    return (mant << shift) + ((1ull << shift) >> 1);
}

static inline void hist_record(uint64_t v)
{
    hist[hist_index(v)]++;
    hist_count++;
    hist_sum += (double)v;
    if (v > hist_max)
        hist_max = v;
}

static double hist_percentile_us(double p)
{
    if (!hist_count)
        return 0;
    uint64_t want = (uint64_t)(p / 100.0 * (double)hist_count);
    if (want >= hist_count)
        want = hist_count - 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen > want) {
            uint64_t v = hist_value(i);
            return (v > hist_max ? hist_max : v) / 1000.0;
        }
    }
    return hist_max / 1000.0;
}

/* ------------------------------------------------------------------ buffers */

typedef struct {
    uint8_t *data;
    size_t len, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra)
        cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(2);
    }
    b->cap = cap;
}

static inline void buf_put(buf_t *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void buf_consume(buf_t *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void buf_free(buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ------------------------------------------------------------------ connections */

typedef struct conn {
    int fd;
    enum role role;
    int index; /* publisher / subscriber / idle index */
    enum cstate state;
    int want_out; /* EPOLLOUT registered */
    int dirty;    /* output pending, on the flush list */
    buf_t in, out;
    uint64_t last_send_ns;
    uint16_t next_pid;
    int receive_max; /* MQTT 5 CONNACK Receive Maximum, 0 = none */
} conn_t;

typedef struct {
    conn_t *c;
    char topic[64];
    int topic_len;
    int fanout;            /* deliveries expected per message */
    uint64_t sent;         /* messages written */
    uint64_t acked;        /* PUBACK / PUBCOMP */
    uint64_t delivered;    /* deliveries seen at any subscriber */
    uint64_t written_off;  /* QoS 0 credit given up after a stall */
    uint32_t seq;
    uint64_t last_progress_ns;
    uint8_t *tmpl; /* PUBLISH packet template */
    int tmpl_len, pid_off, payload_off;
} pub_t;

static conn_t **conns;
static int n_conns;
static pub_t *pubs;
static conn_t **subs_c;
static int epfd, timer_fd = -1;
static conn_t **flush_list;
static int n_flush;
static uint8_t *read_chunk;

static enum phase phase = P_SETUP;
static uint64_t t_start, t_measure, t_measure_end, t_end, t_drain_end;
static uint64_t last_progress_ns;

/* counters */
static uint64_t received_total, received_measure, sent_total, sent_measure;
static uint64_t reorders, stalls, skipped, disconnects, pings;
static uint64_t n_reads, n_writes, n_waits; /* system calls, to see what the broker makes us do */
static uint32_t *last_seq; /* [sub * npubs + pub] + 1, 0 = none yet */
static int track_order;
static int ready_count, connect_started, connects_done;
static uint64_t open_k; /* open loop: next global message number */

static char error_msg[512];
static int failed;

static volatile sig_atomic_t interrupted;

static void fail(const char *fmt, ...)
{
    if (failed)
        return;
    failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_msg, sizeof error_msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "loadgen: %s\n", error_msg);
}

/* ------------------------------------------------------------------ MQTT encoding */

static int put_varint(uint8_t *p, uint32_t v)
{
    int n = 0;
    do {
        uint8_t b = v % 128;
        v /= 128;
        if (v)
            b |= 0x80;
        p[n++] = b;
    } while (v);
    return n;
}

static inline void mark_dirty(conn_t *c)
{
    if (!c->dirty && c->state != C_CLOSED) {
        c->dirty = 1;
        flush_list[n_flush++] = c;
    }
}

static void send_connect(conn_t *c)
{
    char cid[64];
    const char *kind = c->role == R_PUB ? "p" : c->role == R_SUB ? "s" : "i";
    int cid_len = snprintf(cid, sizeof cid, "lg%d-%s%d", (int)getpid(), kind, c->index);
    uint8_t vh[64];
    int n = 0;
    vh[n++] = 0;
    vh[n++] = 4;
    memcpy(vh + n, "MQTT", 4);
    n += 4;
    vh[n++] = (uint8_t)opt.mqtt_version;
    /* clean session / clean start, unless subscribers keep a persistent session */
    vh[n++] = (opt.persistent_subs && c->role == R_SUB) ? 0x00 : 0x02;
    vh[n++] = (uint8_t)(opt.keepalive >> 8);
    vh[n++] = (uint8_t)opt.keepalive;
    if (opt.mqtt_version == 5)
        vh[n++] = 0; /* no properties */
    vh[n++] = (uint8_t)(cid_len >> 8);
    vh[n++] = (uint8_t)cid_len;
    memcpy(vh + n, cid, cid_len);
    n += cid_len;
    uint8_t hdr[5];
    hdr[0] = 0x10;
    int h = 1 + put_varint(hdr + 1, (uint32_t)n);
    buf_put(&c->out, hdr, h);
    buf_put(&c->out, vh, n);
    mark_dirty(c);
}

static void send_subscribe(conn_t *c)
{
    const char *filter = opt.layout == L_PAIRS ? NULL : opt.layout == L_FANOUT ? "bench/0" : "bench/+";
    char pairs_filter[32];
    if (!filter) {
        snprintf(pairs_filter, sizeof pairs_filter, "bench/%d", c->index);
        filter = pairs_filter;
    }
    int flen = (int)strlen(filter);
    uint8_t p[128];
    int n = 0;
    uint8_t body[96];
    int b = 0;
    body[b++] = 0;
    body[b++] = 1; /* packet identifier 1 */
    if (opt.mqtt_version == 5)
        body[b++] = 0;
    body[b++] = (uint8_t)(flen >> 8);
    body[b++] = (uint8_t)flen;
    memcpy(body + b, filter, flen);
    b += flen;
    body[b++] = (uint8_t)opt.qos;
    p[n++] = 0x82; /* SUBSCRIBE, reserved bits 0010 [MQTT-3.8.1-1] */
    n += put_varint(p + n, (uint32_t)b);
    memcpy(p + n, body, b);
    n += b;
    buf_put(&c->out, p, n);
    mark_dirty(c);
}

static void send_ack(conn_t *c, uint8_t type_byte, uint16_t pid)
{
    uint8_t p[4] = {type_byte, 2, (uint8_t)(pid >> 8), (uint8_t)pid};
    buf_put(&c->out, p, 4);
    mark_dirty(c);
}

static void build_template(pub_t *p, int index)
{
    p->topic_len = snprintf(p->topic, sizeof p->topic, "bench/%d", opt.layout == L_FANOUT ? 0 : index);
    int vh = 2 + p->topic_len + (opt.qos ? 2 : 0) + (opt.mqtt_version == 5 ? 1 : 0);
    int rem = vh + opt.payload;
    p->tmpl = calloc(1, 5 + rem);
    int n = 0;
    p->tmpl[n++] = (uint8_t)(0x30 | (opt.qos << 1));
    n += put_varint(p->tmpl + n, (uint32_t)rem);
    p->tmpl[n++] = (uint8_t)(p->topic_len >> 8);
    p->tmpl[n++] = (uint8_t)p->topic_len;
    memcpy(p->tmpl + n, p->topic, p->topic_len);
    n += p->topic_len;
    p->pid_off = -1;
    if (opt.qos) {
        p->pid_off = n;
        n += 2;
    }
    if (opt.mqtt_version == 5)
        p->tmpl[n++] = 0;
    p->payload_off = n;
    for (int i = PAYLOAD_HEADER; i < opt.payload; i++)
        p->tmpl[n + i] = (uint8_t)('a' + i % 26);
    n += opt.payload;
    p->tmpl_len = n;
}

static inline void publish_one(pub_t *p, uint64_t now)
{
    conn_t *c = p->c;
    buf_reserve(&c->out, p->tmpl_len);
    uint8_t *dst = c->out.data + c->out.len;
    memcpy(dst, p->tmpl, p->tmpl_len);
    if (p->pid_off >= 0) {
        if (++c->next_pid == 0)
            c->next_pid = 1;
        dst[p->pid_off] = (uint8_t)(c->next_pid >> 8);
        dst[p->pid_off + 1] = (uint8_t)c->next_pid;
    }
    uint8_t *pl = dst + p->payload_off;
    uint32_t idx = (uint32_t)c->index, seq = p->seq++;
    memcpy(pl, &now, 8);
    memcpy(pl + 8, &idx, 4);
    memcpy(pl + 12, &seq, 4);
    c->out.len += p->tmpl_len;
    p->sent++;
    sent_total++;
    if (phase == P_MEASURE)
        sent_measure++;
    mark_dirty(c);
}

/* ------------------------------------------------------------------ socket plumbing */

static void conn_close(conn_t *c, const char *why)
{
    if (c->state == C_CLOSED)
        return;
    if (why && phase != P_DONE) {
        disconnects++;
        fail("%s connection %d closed: %s", c->role == R_PUB ? "publisher" : c->role == R_SUB ? "subscriber" : "idle",
             c->index, why);
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    /* An abortive close (RST) keeps thousands of short runs from filling the
     * port range with TIME_WAIT sockets. */
    struct linger lg = {1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(c->fd);
    c->fd = -1;
    c->state = C_CLOSED;
    buf_free(&c->in);
    buf_free(&c->out);
}

static void set_out_interest(conn_t *c, int want)
{
    if (c->want_out == want || c->state == C_CLOSED)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

static void flush_conn(conn_t *c)
{
    if (c->state == C_CLOSED || c->state == C_CONNECTING)
        return;
    size_t off = 0;
    while (off < c->out.len) {
        ssize_t w = write(c->fd, c->out.data + off, c->out.len - off);
        n_writes++;
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_close(c, w < 0 ? strerror(errno) : "write returned 0");
        return;
    }
    buf_consume(&c->out, off);
    c->last_send_ns = mono_ns();
    set_out_interest(c, c->out.len > 0);
}

static void flush_all(void)
{
    for (int i = 0; i < n_flush; i++) {
        conn_t *c = flush_list[i];
        c->dirty = 0;
        flush_conn(c);
    }
    n_flush = 0;
}

static void start_connect(conn_t *c)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    if (inet_pton(AF_INET, opt.host, &sa.sin_addr) != 1) {
        struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
        if (getaddrinfo(opt.host, NULL, &hints, &res) != 0) {
            fprintf(stderr, "loadgen: cannot resolve host %s\n", opt.host);
            exit(2);
        }
        sa.sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
        freeaddrinfo(res);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail("socket(): %s (raise the open-file limit?)", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = C_CONNECTING;
    c->want_out = 1;
    connect_started++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        int e = errno;
        if (e == ECONNREFUSED) {
            fprintf(stderr, "loadgen: connection refused by %s:%d (is the broker running?)\n", opt.host, opt.port);
            printf("{\"ok\":false,\"error\":\"connection refused by %s:%d\"}\n", opt.host, opt.port);
            exit(2);
        }
        conn_close(c, strerror(e));
    }
}

static void on_connected(conn_t *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        if (err == ECONNREFUSED) {
            fprintf(stderr, "loadgen: connection refused by %s:%d (is the broker running?)\n", opt.host, opt.port);
            printf("{\"ok\":false,\"error\":\"connection refused by %s:%d\"}\n", opt.host, opt.port);
            exit(2);
        }
        conn_close(c, strerror(err));
        return;
    }
    c->state = C_WAIT_CONNACK;
    c->want_out = 1; /* registered with EPOLLOUT; flush_conn clears it */
    send_connect(c);
}

/* ------------------------------------------------------------------ incoming packets */

static void became_ready(conn_t *c)
{
    c->state = C_READY;
    ready_count++;
}

static void on_publish(conn_t *c, uint8_t flags, const uint8_t *p, uint32_t len, uint64_t now)
{
    int qos = (flags >> 1) & 3;
    if (len < 2)
        return;
    uint32_t tlen = ((uint32_t)p[0] << 8) | p[1];
    uint32_t off = 2 + tlen;
    uint16_t pid = 0;
    if (qos) {
        if (off + 2 > len)
            return;
        pid = (uint16_t)((p[off] << 8) | p[off + 1]);
        off += 2;
    }
    if (opt.mqtt_version == 5) { /* skip properties */
        uint32_t plen = 0, mul = 1;
        while (off < len) {
            uint8_t b = p[off++];
            plen += (b & 127) * mul;
            mul *= 128;
            if (!(b & 128))
                break;
        }
        off += plen;
    }
    if (qos == 1)
        send_ack(c, 0x40, pid); /* PUBACK */
    else if (qos == 2)
        send_ack(c, 0x50, pid); /* PUBREC */
    if (off + PAYLOAD_HEADER > len)
        return;
    uint64_t ts;
    uint32_t pub, seq;
    memcpy(&ts, p + off, 8);
    memcpy(&pub, p + off + 8, 4);
    memcpy(&seq, p + off + 12, 4);
    if (pub >= (uint32_t)opt.pubs)
        return;
    received_total++;
    last_progress_ns = now;
    pub_t *pb = &pubs[pub];
    pb->delivered++;
    pb->last_progress_ns = now;
    if (track_order) {
        uint32_t *ls = &last_seq[(size_t)c->index * opt.pubs + pub];
        if (*ls && seq + 1 <= *ls)
            reorders++;
        *ls = seq + 1;
    }
    if (phase == P_MEASURE)
        received_measure++;
    if (t_measure && ts >= t_measure && now >= ts)
        hist_record(now - ts); /* sent after the warm-up */
}

static void on_packet(conn_t *c, uint8_t type, uint8_t flags, const uint8_t *p, uint32_t len, uint64_t now)
{
    switch (type) {
    case 2: /* CONNACK */
        if (c->state != C_WAIT_CONNACK || len < 2) {
            conn_close(c, "unexpected CONNACK");
            return;
        }
        if (p[1] != 0) {
            char why[64];
            snprintf(why, sizeof why, "CONNACK refused, code 0x%02x", p[1]);
            conn_close(c, why);
            return;
        }
        if (opt.mqtt_version == 5 && len > 2) { /* properties: look for Receive Maximum (0x21) */
            uint32_t off = 2, plen = 0, mul = 1;
            while (off < len) {
                uint8_t b = p[off++];
                plen += (b & 127) * mul;
                mul *= 128;
                if (!(b & 128))
                    break;
            }
            uint32_t end = off + plen < len ? off + plen : len;
            while (off < end) { /* only the fixed-size properties a broker sends here are walked */
                uint8_t id = p[off++];
                if (id == 0x21 && off + 2 <= end) {
                    c->receive_max = (p[off] << 8) | p[off + 1];
                    off += 2;
                } else if (id == 0x24 || id == 0x25 || id == 0x28 || id == 0x29 || id == 0x2A || id == 0x17 || id == 0x19) {
                    off += 1;
                } else if (id == 0x13 || id == 0x22 || id == 0x21) {
                    off += 2;
                } else if (id == 0x11 || id == 0x27) {
                    off += 4;
                } else {
                    break; /* strings etc.: stop, receive maximum usually comes first */
                }
            }
        }
        if (c->role == R_SUB) {
            c->state = C_WAIT_SUBACK;
            send_subscribe(c);
        } else {
            became_ready(c);
            connects_done++;
        }
        if (c->role == R_SUB)
            connects_done++;
        break;
    case 9: /* SUBACK */
        if (c->state != C_WAIT_SUBACK || len < 3) {
            conn_close(c, "unexpected SUBACK");
            return;
        }
        if (p[len - 1] >= 0x80) {
            conn_close(c, "subscription refused");
            return;
        }
        became_ready(c);
        break;
    case 3:
        on_publish(c, flags, p, len, now);
        break;
    case 4: /* PUBACK */
    case 7: /* PUBCOMP */
        if (c->role == R_PUB) {
            pub_t *pb = &pubs[c->index];
            pb->acked++;
            pb->last_progress_ns = now;
            last_progress_ns = now;
        }
        break;
    case 5: /* PUBREC: answer PUBREL, reserved bits 0010 [MQTT-3.6.1-1] */
        if (len >= 2)
            send_ack(c, 0x62, (uint16_t)((p[0] << 8) | p[1]));
        break;
    case 6: /* PUBREL: answer PUBCOMP */
        if (len >= 2)
            send_ack(c, 0x70, (uint16_t)((p[0] << 8) | p[1]));
        break;
    case 13: /* PINGRESP */
        break;
    case 14: /* DISCONNECT from the server */
        conn_close(c, len >= 1 ? "DISCONNECT from broker" : "DISCONNECT from broker");
        break;
    default: {
        char why[64];
        snprintf(why, sizeof why, "unexpected packet type %d", type);
        conn_close(c, why);
    }
    }
}

/* Parse every complete packet in [data, data+len); return bytes consumed. */
static size_t parse_packets(conn_t *c, const uint8_t *data, size_t len, uint64_t now)
{
    size_t off = 0;
    while (off + 2 <= len && c->state != C_CLOSED) {
        uint32_t rem = 0, mul = 1;
        size_t i = off + 1;
        int complete_len = 0;
        for (int k = 0; k < 4 && i < len; k++) {
            uint8_t b = data[i++];
            rem += (b & 127) * mul;
            mul *= 128;
            if (!(b & 128)) {
                complete_len = 1;
                break;
            }
            if (k == 3) {
                conn_close(c, "malformed remaining length");
                return len;
            }
        }
        if (!complete_len || i + rem > len)
            break;
        on_packet(c, data[off] >> 4, data[off] & 15, data + i, rem, now);
        off = i + rem;
    }
    return off;
}

static void on_readable(conn_t *c)
{
    for (int rounds = 0; rounds < 4 && c->state != C_CLOSED; rounds++) {
        ssize_t r;
        if (c->in.len == 0) {
            r = read(c->fd, read_chunk, READ_CHUNK);
            n_reads++;
            if (r > 0) {
                uint64_t now = mono_ns();
                size_t used = parse_packets(c, read_chunk, (size_t)r, now);
                if (c->state != C_CLOSED && used < (size_t)r)
                    buf_put(&c->in, read_chunk + used, (size_t)r - used);
            }
        } else {
            buf_reserve(&c->in, READ_CHUNK);
            r = read(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len);
            n_reads++;
            if (r > 0) {
                c->in.len += (size_t)r;
                uint64_t now = mono_ns();
                size_t used = parse_packets(c, c->in.data, c->in.len, now);
                if (c->state != C_CLOSED)
                    buf_consume(&c->in, used);
            }
        }
        if (r == 0) {
            conn_close(c, "closed by broker");
            return;
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                conn_close(c, strerror(errno));
            return;
        }
        if ((size_t)r < READ_CHUNK)
            return; /* drained what was there */
    }
}

/* ------------------------------------------------------------------ broker processes (/proc) */

static long clk_tck;

/* Sum utime+stime (seconds) and RSS / PSS (kB) of the given processes and
 * all their descendants. */
static void proc_tree_sample(double *cpu_s, long *rss_kb, long *pss_kb, int *nprocs)
{
    *cpu_s = 0;
    *rss_kb = *pss_kb = 0;
    *nprocs = 0;
    if (!opt.n_cpu_pids)
        return;
    enum { MAXP = 65536 };
    static int pid_of[MAXP], ppid_of[MAXP];
    static double cpu_of[MAXP];
    int n = 0;
    DIR *d = opendir("/proc");
    if (!d)
        return;
    struct dirent *de;
    char path[300], line[1024];
    while ((de = readdir(d)) && n < MAXP) {
        if (!isdigit((unsigned char)de->d_name[0]))
            continue;
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t got = fread(line, 1, sizeof line - 1, f);
        fclose(f);
        line[got] = 0;
        char *rp = strrchr(line, ')');
        if (!rp)
            continue;
        /* after ')': state(3) ppid(4) ... utime(14) stime(15) */
        char st;
        int ppid;
        unsigned long ut, stt;
        if (sscanf(rp + 2, "%c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &st, &ppid, &ut, &stt) != 4)
            continue;
        pid_of[n] = atoi(de->d_name);
        ppid_of[n] = ppid;
        cpu_of[n] = (double)(ut + stt) / (double)clk_tck;
        n++;
    }
    closedir(d);
    /* Descendants: repeat until no new member (trees here are shallow). */
    static char in_tree[MAXP];
    memset(in_tree, 0, (size_t)n);
    int changed = 1;
    while (changed) {
        changed = 0;
        for (int i = 0; i < n; i++) {
            if (in_tree[i])
                continue;
            int member = 0;
            for (int k = 0; k < opt.n_cpu_pids; k++)
                if (pid_of[i] == opt.cpu_pids[k])
                    member = 1;
            for (int j = 0; j < n && !member; j++)
                if (in_tree[j] && pid_of[j] == ppid_of[i])
                    member = 1;
            if (member) {
                in_tree[i] = 1;
                changed = 1;
            }
        }
    }
    for (int i = 0; i < n; i++) {
        if (!in_tree[i])
            continue;
        (*nprocs)++;
        *cpu_s += cpu_of[i];
        snprintf(path, sizeof path, "/proc/%d/status", pid_of[i]);
        FILE *f = fopen(path, "r");
        if (f) {
            while (fgets(line, sizeof line, f))
                if (!strncmp(line, "VmRSS:", 6))
                    *rss_kb += atol(line + 6);
            fclose(f);
        }
        snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid_of[i]);
        f = fopen(path, "r");
        if (f) {
            while (fgets(line, sizeof line, f))
                if (!strncmp(line, "Pss:", 4))
                    *pss_kb += atol(line + 4);
            fclose(f);
        }
    }
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------------ load */

/* Deliveries still expected from publisher p (QoS 0), or messages not yet
 * both acknowledged and delivered (QoS 1/2), in units of deliveries: a broker
 * acknowledges a QoS 1/2 PUBLISH on receipt, so counting PUBACKs alone would
 * let a publisher run ahead of its subscribers until the broker's queue
 * overflows and drops messages. */
static inline uint64_t pub_outstanding(const pub_t *p)
{
    uint64_t expect = p->sent * (uint64_t)p->fanout;
    uint64_t done = p->delivered + p->written_off;
    uint64_t undelivered = expect > done ? expect - done : 0;
    if (opt.qos == 0)
        return undelivered;
    uint64_t unacked = p->sent > p->acked ? (p->sent - p->acked) * (uint64_t)p->fanout : 0;
    return unacked > undelivered ? unacked : undelivered;
}

static void closed_loop_fill(uint64_t now)
{
    for (int i = 0; i < opt.pubs; i++) {
        pub_t *p = &pubs[i];
        if (p->c->state != C_READY || p->c->out.len > OUT_HIGH_WATER)
            continue;
        uint64_t limit = (uint64_t)opt.window * p->fanout;
        uint64_t out = pub_outstanding(p);
        int step = p->fanout;
        int burst = 0;
        /* Refill only once --refill messages' worth of credit is free, so a
         * broker that returns deliveries one by one still gets publishes in
         * batches (one write each), not one write per message. */
        int refill_due = !out || out + (uint64_t)opt.refill * step <= limit;
        /* [MQTT-4.9.0-2]: no more unacknowledged QoS 1/2 PUBLISHes than the
         * server's Receive Maximum */
        uint64_t unacked_cap = opt.qos && p->c->receive_max ? (uint64_t)p->c->receive_max : UINT64_MAX;
        while (refill_due && out + step <= limit && burst < 1024 && p->sent - p->acked < unacked_cap) {
            publish_one(p, now);
            out += step;
            burst++;
        }
        if (!burst && out && now - p->last_progress_ns > 1000000000ull) {
            /* A publisher whose window has been full for 1 s without a
             * single delivery: the broker dropped a message (QoS 0, or a
             * full queue).
             * Give up that credit (counted in "lost" at the end). */
            uint64_t expect = p->sent * (uint64_t)p->fanout;
            if (expect > p->delivered + p->written_off) {
                p->written_off = expect - p->delivered;
                stalls++;
            }
            p->last_progress_ns = now;
        }
    }
}

static void open_loop_fill(uint64_t now)
{
    double elapsed = (double)(now - t_start) / 1e9;
    uint64_t due = (uint64_t)(elapsed * opt.rate);
    int n = opt.pubs;
    while (open_k < due) {
        pub_t *p = &pubs[open_k % (uint64_t)n];
        open_k++;
        if (p->c->state != C_READY || p->c->out.len > OUT_OPEN_CAP ||
            (opt.qos && p->sent - p->acked >= (uint64_t)opt.max_inflight) ||
            (opt.qos && p->c->receive_max && p->sent - p->acked >= (uint64_t)p->c->receive_max)) {
            skipped++;
            continue;
        }
        publish_one(p, now);
    }
}

static void keepalive_pings(uint64_t now)
{
    if (!opt.keepalive)
        return;
    uint64_t half = (uint64_t)opt.keepalive * 500000000ull;
    for (int i = 0; i < n_conns; i++) {
        conn_t *c = conns[i];
        if (c->state == C_READY && now - c->last_send_ns > half) {
            uint8_t p[2] = {0xC0, 0};
            buf_put(&c->out, p, 2);
            mark_dirty(c);
            c->last_send_ns = now;
            pings++;
        }
    }
}

/* ------------------------------------------------------------------ report */

static void report(double setup_s, double cpu_broker_s, double cpu_self_s, long rss0, long rss1, long pss0,
                   long pss1, int nprocs, double measure_s)
{
    static const char *lnames[] = {"pairs", "fanout", "fanin", "idle"};
    uint64_t expected = 0;
    for (int i = 0; i < opt.pubs && opt.layout != L_IDLE; i++)
        expected += pubs[i].sent * (uint64_t)pubs[i].fanout;
    uint64_t acked = 0;
    for (int i = 0; i < opt.pubs && opt.layout != L_IDLE; i++)
        acked += pubs[i].acked;
    long long lost = (long long)expected - (long long)received_total;
    double delivered_rate = measure_s > 0 ? received_measure / measure_s : 0;
    printf("{\"ok\":%s,\"label\":\"%s\",\"layout\":\"%s\",\"mqtt\":\"%s\",\"pubs\":%d,\"subs\":%d,"
           "\"qos\":%d,\"payload\":%d,\"mode\":\"%s\",\"window\":%d,\"rate\":%.0f,"
           "\"duration_s\":%.3f,\"setup_s\":%.3f",
           failed ? "false" : "true", opt.label, lnames[opt.layout], opt.mqtt_version == 5 ? "5.0" : "3.1.1",
           opt.layout == L_IDLE ? 0 : opt.pubs, opt.layout == L_IDLE ? 0 : opt.subs, opt.qos, opt.payload,
           opt.rate > 0 ? "open" : "closed", opt.window, opt.rate, measure_s, setup_s);
    if (opt.layout == L_IDLE) {
        printf(",\"conns\":%d,\"connected\":%d,\"connects_per_s\":%.1f", opt.conns, connects_done,
               setup_s > 0 ? connects_done / setup_s : 0);
    } else {
        printf(",\"sent\":%llu,\"expected\":%llu,\"received\":%llu,\"lost\":%lld,\"acked\":%llu,"
               "\"msgs_per_s\":%.1f,\"sent_per_s\":%.1f,\"reorders\":%llu,\"stalls\":%llu,\"skipped\":%llu",
               (unsigned long long)sent_total, (unsigned long long)expected, (unsigned long long)received_total,
               lost, (unsigned long long)acked, delivered_rate, measure_s > 0 ? sent_measure / measure_s : 0,
               (unsigned long long)reorders, (unsigned long long)stalls, (unsigned long long)skipped);
        printf(",\"latency_us\":{\"count\":%llu,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,"
               "\"p999\":%.1f,\"max\":%.1f}",
               (unsigned long long)hist_count, hist_count ? hist_sum / hist_count / 1000.0 : 0,
               hist_percentile_us(50), hist_percentile_us(90), hist_percentile_us(99), hist_percentile_us(99.9),
               hist_max / 1000.0);
    }
    printf(",\"disconnects\":%llu,\"pings\":%llu,\"syscalls\":{\"read\":%llu,\"write\":%llu,\"epoll_wait\":%llu}",
           (unsigned long long)disconnects, (unsigned long long)pings, (unsigned long long)n_reads,
           (unsigned long long)n_writes, (unsigned long long)n_waits);
    if (opt.n_cpu_pids) {
        printf(",\"broker_procs\":%d,\"broker_cpu_s\":%.3f", nprocs, cpu_broker_s);
        if (opt.layout == L_IDLE) {
            printf(",\"broker_rss_kb_before\":%ld,\"broker_rss_kb_after\":%ld,\"broker_pss_kb_before\":%ld,"
                   "\"broker_pss_kb_after\":%ld,\"rss_bytes_per_conn\":%.1f,\"pss_bytes_per_conn\":%.1f",
                   rss0, rss1, pss0, pss1, connects_done ? (rss1 - rss0) * 1024.0 / connects_done : 0,
                   connects_done ? (pss1 - pss0) * 1024.0 / connects_done : 0);
        } else {
            printf(",\"broker_cpu_us_per_msg\":%.3f,\"broker_cpu_pct\":%.1f",
                   received_measure ? cpu_broker_s * 1e6 / received_measure : 0,
                   measure_s > 0 ? cpu_broker_s / measure_s * 100 : 0);
        }
    }
    printf(",\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_pct\":%.1f", cpu_self_s,
           measure_s > 0 ? cpu_self_s / measure_s * 100 : 0);
    if (failed) {
        printf(",\"error\":\"");
        for (const char *s = error_msg; *s; s++)
            if (*s == '"' || *s == '\\')
                printf("\\%c", *s);
            else if ((unsigned char)*s >= 32)
                putchar(*s);
        printf("\"");
    }
    printf("}\n");
    fflush(stdout);
}

/* ------------------------------------------------------------------ main */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen [options]\n"
            "  -h, --host HOST          broker address (127.0.0.1)\n"
            "  -p, --port PORT          broker port (1883)\n"
            "  -l, --layout L           pairs | fanout | fanin | idle (pairs)\n"
            "  -P, --pubs N             publishers (10; fanout default 1)\n"
            "  -S, --subs M             subscribers (pairs: = pubs; fanout 50; fanin 1)\n"
            "  -n, --conns N            idle layout: connections (1000)\n"
            "  -q, --qos Q              0, 1 or 2 (0)\n"
            "  -s, --payload BYTES      payload size, >= 16 (64)\n"
            "  -w, --window W           closed loop: messages in flight per publisher (100)\n"
            "  -r, --rate R             open loop: R messages/s in total (closed loop if 0)\n"
            "  -d, --duration S         measured seconds (5)\n"
            "      --warmup S           seconds before measuring (1)\n"
            "      --drain S            max seconds to wait for in-flight messages (3)\n"
            "      --persistent-subs    subscribers connect with clean session 0 (3.1.1 only): their QoS >= 1\n"
            "                           deliveries are persistent state (queued/in flight in the broker's store)\n"
            "      --refill N           closed loop: publish again once N messages of the window\n"
            "                           are free (window/4; 1 = top up after every delivery)\n"
            "      --tick-us US         open loop pacing tick (100)\n"
            "      --max-inflight N     open loop QoS>=1: unacknowledged per publisher (1000)\n"
            "      --mqtt 4|5           protocol level: 4 = 3.1.1, 5 = 5.0 (4)\n"
            "      --keepalive S        keep alive (60; PINGREQ at half of it)\n"
            "      --connect-timeout S  all connections up and subscribed within S (20)\n"
            "      --stall-timeout S    abort when nothing is delivered for S (5)\n"
            "      --concurrency N      handshakes in progress at once (50; above a broker's listen\n"
            "                           backlog, dropped SYNs cost 1 s each)\n"
            "      --hold S             idle layout: seconds to hold connections (2)\n"
            "      --cpu-pid PID        broker process: CPU and memory of it and its children\n"
            "      --label TEXT         copied into the JSON output\n");
    exit(2);
}

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

int main(int argc, char **argv)
{
    static struct option longopts[] = {
        {"host", 1, 0, 'h'},        {"port", 1, 0, 'p'},          {"layout", 1, 0, 'l'},
        {"pubs", 1, 0, 'P'},        {"subs", 1, 0, 'S'},          {"conns", 1, 0, 'n'},
        {"qos", 1, 0, 'q'},         {"payload", 1, 0, 's'},       {"window", 1, 0, 'w'},
        {"rate", 1, 0, 'r'},        {"duration", 1, 0, 'd'},      {"warmup", 1, 0, 1},
        {"drain", 1, 0, 2},         {"tick-us", 1, 0, 3},         {"max-inflight", 1, 0, 4},
        {"mqtt", 1, 0, 5},          {"keepalive", 1, 0, 6},       {"connect-timeout", 1, 0, 7},
        {"stall-timeout", 1, 0, 8}, {"concurrency", 1, 0, 9},     {"hold", 1, 0, 10},
        {"cpu-pid", 1, 0, 11},      {"label", 1, 0, 12},          {"refill", 1, 0, 13}, {"persistent-subs", 0, 0, 14},          {"help", 0, 0, '?'},
        {0, 0, 0, 0}};
    int ch, pubs_set = 0;
    while ((ch = getopt_long(argc, argv, "h:p:l:P:S:n:q:s:w:r:d:", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'l':
            if (!strcmp(optarg, "pairs")) opt.layout = L_PAIRS;
            else if (!strcmp(optarg, "fanout")) opt.layout = L_FANOUT;
            else if (!strcmp(optarg, "fanin")) opt.layout = L_FANIN;
            else if (!strcmp(optarg, "idle")) opt.layout = L_IDLE;
            else usage();
            break;
        case 'P': opt.pubs = atoi(optarg); pubs_set = 1; break;
        case 'S': opt.subs = atoi(optarg); break;
        case 'n': opt.conns = atoi(optarg); break;
        case 'q': opt.qos = atoi(optarg); break;
        case 's': opt.payload = atoi(optarg); break;
        case 'w': opt.window = atoi(optarg); break;
        case 'r': opt.rate = atof(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 1: opt.warmup = atof(optarg); break;
        case 2: opt.drain = atof(optarg); break;
        case 3: opt.tick_us = atoi(optarg); break;
        case 4: opt.max_inflight = atoi(optarg); break;
        case 5: opt.mqtt_version = atoi(optarg) == 5 ? 5 : 4; break;
        case 6: opt.keepalive = atoi(optarg); break;
        case 7: opt.connect_timeout = atof(optarg); break;
        case 8: opt.stall_timeout = atof(optarg); break;
        case 9: opt.connect_concurrency = atoi(optarg); break;
        case 10: opt.hold = atof(optarg); break;
        case 11:
            if (opt.n_cpu_pids < MAX_CPU_PIDS) opt.cpu_pids[opt.n_cpu_pids++] = atoi(optarg);
            break;
        case 12: opt.label = optarg; break;
        case 13: opt.refill = atoi(optarg); break;
        case 14: opt.persistent_subs = 1; break;
        default: usage();
        }
    }
    if (opt.layout == L_FANOUT && !pubs_set)
        opt.pubs = 1;
    if (opt.subs < 0)
        opt.subs = opt.layout == L_PAIRS ? opt.pubs : opt.layout == L_FANOUT ? 50 : 1;
    if (opt.layout == L_PAIRS)
        opt.subs = opt.pubs;
    if (opt.refill < 0)
        opt.refill = opt.window / 4 > 0 ? opt.window / 4 : 1;
    if (opt.refill > opt.window)
        opt.refill = opt.window;
    if (opt.qos < 0 || opt.qos > 2 || opt.payload < PAYLOAD_HEADER || opt.pubs < 1 || opt.subs < 1 ||
        opt.window < 1 || opt.port <= 0 || opt.conns < 1 || opt.tick_us < 1)
        usage();

    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    clk_tck = sysconf(_SC_CLK_TCK);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    read_chunk = malloc(READ_CHUNK);
    epfd = epoll_create1(EPOLL_CLOEXEC);

    /* connections: subscribers first (they must be subscribed before anyone
     * publishes), then publishers; or only idle ones */
    int n_pub = opt.layout == L_IDLE ? 0 : opt.pubs;
    int n_sub = opt.layout == L_IDLE ? 0 : opt.subs;
    int n_idle = opt.layout == L_IDLE ? opt.conns : 0;
    n_conns = n_pub + n_sub + n_idle;
    conns = calloc((size_t)n_conns, sizeof *conns);
    flush_list = calloc((size_t)n_conns, sizeof *flush_list);
    pubs = calloc((size_t)(n_pub ? n_pub : 1), sizeof *pubs);
    subs_c = calloc((size_t)(n_sub ? n_sub : 1), sizeof *subs_c);
    int k = 0;
    for (int j = 0; j < n_sub; j++) {
        conn_t *c = calloc(1, sizeof *c);
        c->role = R_SUB;
        c->index = j;
        c->fd = -1;
        subs_c[j] = c;
        conns[k++] = c;
    }
    for (int i = 0; i < n_pub; i++) {
        conn_t *c = calloc(1, sizeof *c);
        c->role = R_PUB;
        c->index = i;
        c->fd = -1;
        pubs[i].c = c;
        pubs[i].fanout = opt.layout == L_PAIRS ? 1 : opt.subs;
        build_template(&pubs[i], i);
        conns[k++] = c;
    }
    for (int i = 0; i < n_idle; i++) {
        conn_t *c = calloc(1, sizeof *c);
        c->role = R_IDLE;
        c->index = i;
        c->fd = -1;
        conns[k++] = c;
    }
    if ((uint64_t)n_pub * (uint64_t)n_sub <= 4000000ull && n_pub) {
        last_seq = calloc((size_t)n_pub * n_sub, sizeof *last_seq);
        track_order = 1;
    }

    double cpu0 = 0, cpu1 = 0, self0 = 0, self1 = 0;
    long rss0 = 0, rss1 = 0, pss0 = 0, pss1 = 0;
    int nprocs = 0;
    if (opt.layout == L_IDLE)
        proc_tree_sample(&cpu0, &rss0, &pss0, &nprocs);

    uint64_t t_setup = mono_ns();
    uint64_t setup_deadline = t_setup + (uint64_t)(opt.connect_timeout * 1e9);
    int next_conn = 0;
    struct epoll_event events[1024];
    double setup_s = 0;
    uint64_t last_ping_check = t_setup, hold_until = 0;
    last_progress_ns = t_setup;

    while (phase != P_DONE) {
        uint64_t now = mono_ns();
        if (interrupted)
            fail("interrupted");
        if (failed)
            break;

        if (phase == P_SETUP) {
            /* keep at most --concurrency handshakes in progress; subscribers
             * (first in the list) finish before publishers start */
            while (next_conn < n_conns && connect_started - ready_count < opt.connect_concurrency) {
                if (conns[next_conn]->role == R_PUB && ready_count < n_sub)
                    break;
                start_connect(conns[next_conn++]);
                if (failed)
                    break;
            }
            if (ready_count == n_conns) {
                setup_s = (double)(mono_ns() - t_setup) / 1e9;
                now = mono_ns();
                if (opt.layout == L_IDLE) {
                    hold_until = now + (uint64_t)(opt.hold * 1e9);
                    phase = P_MEASURE;
                } else {
                    t_start = now;
                    t_measure = now + (uint64_t)(opt.warmup * 1e9);
                    t_measure_end = t_measure + (uint64_t)(opt.duration * 1e9);
                    phase = P_WARMUP;
                    last_progress_ns = now;
                    for (int i = 0; i < n_pub; i++)
                        pubs[i].last_progress_ns = now;
                    if (opt.rate > 0) {
                        timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
                        struct itimerspec its = {{0, opt.tick_us * 1000L}, {0, opt.tick_us * 1000L}};
                        timerfd_settime(timer_fd, 0, &its, NULL);
                        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
                        epoll_ctl(epfd, EPOLL_CTL_ADD, timer_fd, &ev);
                    }
                }
            } else if (now > setup_deadline) {
                fail("setup timed out: %d of %d connections ready after %.1f s", ready_count, n_conns,
                     opt.connect_timeout);
                break;
            }
        } else if (phase == P_WARMUP && now >= t_measure) {
            phase = P_MEASURE;
            proc_tree_sample(&cpu0, &rss0, &pss0, &nprocs);
            self0 = self_cpu_s();
        } else if (phase == P_MEASURE && opt.layout == L_IDLE && now >= hold_until) {
            proc_tree_sample(&cpu1, &rss1, &pss1, &nprocs);
            phase = P_DONE;
            break;
        } else if (phase == P_MEASURE && opt.layout != L_IDLE && now >= t_measure_end) {
            proc_tree_sample(&cpu1, &rss1, &pss1, &nprocs);
            self1 = self_cpu_s();
            phase = P_DRAIN;
            t_end = now;
            t_drain_end = now + (uint64_t)(opt.drain * 1e9);
            if (timer_fd >= 0) {
                close(timer_fd);
                timer_fd = -1;
            }
        }
        if (phase == P_DRAIN) {
            uint64_t expected = 0, unacked = 0;
            for (int i = 0; i < n_pub; i++) {
                expected += pubs[i].sent * (uint64_t)pubs[i].fanout;
                if (opt.qos)
                    unacked += pubs[i].sent - pubs[i].acked;
            }
            if ((received_total >= expected && unacked == 0) || now >= t_drain_end) {
                phase = P_DONE;
                break;
            }
        }
        if ((phase == P_WARMUP || phase == P_MEASURE) && opt.layout != L_IDLE &&
            now - last_progress_ns > (uint64_t)(opt.stall_timeout * 1e9)) {
            fail("no message delivered or acknowledged for %.1f s", opt.stall_timeout);
            break;
        }

        if ((phase == P_WARMUP || phase == P_MEASURE) && opt.rate <= 0 && opt.layout != L_IDLE)
            closed_loop_fill(now);
        if (now - last_ping_check > 1000000000ull) {
            keepalive_pings(now);
            last_ping_check = now;
        }
        flush_all();

        int timeout_ms = 10;
        if ((phase == P_WARMUP || phase == P_MEASURE) && opt.rate <= 0)
            timeout_ms = 1;
        int n = epoll_wait(epfd, events, 1024, timeout_ms);
        n_waits++;
        if (n < 0 && errno != EINTR) {
            fail("epoll_wait: %s", strerror(errno));
            break;
        }
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (!c) { /* pacing timer */
                uint64_t expirations;
                if (read(timer_fd, &expirations, sizeof expirations) < 0) {
                }
                if (phase == P_WARMUP || phase == P_MEASURE)
                    open_loop_fill(mono_ns());
                continue;
            }
            if (c->state == C_CLOSED)
                continue;
            uint32_t evs = events[e].events;
            if (c->state == C_CONNECTING) {
                if (evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    on_connected(c);
                continue;
            }
            if (evs & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
            if ((evs & EPOLLOUT) && c->state != C_CLOSED)
                mark_dirty(c);
        }
    }

    double measure_s = 0;
    if (opt.layout == L_IDLE) {
        measure_s = opt.hold;
    } else if (t_end) {
        measure_s = (double)(t_end - t_measure) / 1e9;
    } else if (phase == P_MEASURE) { /* failed mid-measurement */
        uint64_t now = mono_ns();
        measure_s = (double)(now - t_measure) / 1e9;
        proc_tree_sample(&cpu1, &rss1, &pss1, &nprocs);
        self1 = self_cpu_s();
    }
    if (opt.layout == L_IDLE && !setup_s)
        setup_s = (double)(mono_ns() - t_setup) / 1e9;
    if (opt.layout == L_IDLE && phase != P_DONE)
        proc_tree_sample(&cpu1, &rss1, &pss1, &nprocs);

    if (!failed && opt.layout != L_IDLE && sent_total && !received_total)
        fail("the broker delivered none of the %llu messages sent", (unsigned long long)sent_total);
    phase = P_DONE;
    /* polite DISCONNECT, then close */
    for (int i = 0; i < n_conns; i++) {
        conn_t *c = conns[i];
        if (c->state == C_READY) {
            uint8_t d[2] = {0xE0, 0};
            if (write(c->fd, d, 2) < 0) {
            }
        }
        conn_close(c, NULL);
    }
    report(setup_s, cpu1 - cpu0, self1 - self0, rss0, rss1, pss0, pss1, nprocs, measure_s);
    return failed ? 1 : 0;
}
