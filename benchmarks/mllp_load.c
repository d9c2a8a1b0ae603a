/*
 * mllp_load: a closed-loop MLLP load generator for 127.0.0.1.
 *
 * Each of CONNS connections keeps exactly one message in flight: it writes one
 * framed message (<VT> message <FS><CR>), waits until it has read one whole
 * ACK frame (up to and including <FS><CR>), records the round-trip time, and
 * sends the next message. One thread, non-blocking sockets, epoll, so the
 * generator costs far less CPU per message than any Python listener.
 *
 * Messages: each -m FILE is one HL7 message. A file that already starts with
 * <VT> is sent as it is; any other file has its line ends (CRLF, LF) turned
 * into CR (the HL7 segment terminator) and is framed here. With several -m
 * files, each connection sends them in turn, starting at a different one.
 * Without -m a small built-in ADT message is sent.
 *
 * Measurement: ACKs that arrive in the first WARMUP seconds are not recorded.
 * Every ACK that arrives inside the measurement window that follows is
 * counted and its latency (first byte of the message written -> last byte of
 * the ACK read) kept; throughput is that count over the window's length. When the
 * window ends no new message is sent; ACKs still in flight are read (not
 * counted) for up to two seconds so that the listener sees a clean close.
 * With -n COUNT the window ends after COUNT counted ACKs instead (or at the
 * -d limit, whichever comes first).
 *
 * Output: one JSON object on one line on stdout, e.g.
 *   {"tool": "hl7bridge-mllp_load", "connections": 8, "window_s": 5.000,
 *    "acked": 12345, "msgs_per_s": 2469.0, "p50_us": 3100.2, "p99_us": 8000.1, ...}
 * The keys msgs_per_s, p50_us and p99_us mean the same as those of
 * ../shared/bench/mllp_load.c, so figures from the two can be compared.
 *
 * Exit status: 0 if at least one ACK was counted and no connection failed,
 * 1 on a run-time failure (the JSON line is still printed), 2 on bad usage.
 *
 * Build: cc -O2 -o mllp_load mllp_load.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define VT 0x0b
#define FS 0x1c
#define CR 0x0d

static const char BUILTIN_MESSAGE[] =
    "MSH|^~\\&|LOADGEN|LOADFAC|BRIDGE|BRIDGEFAC|20250101000000||ADT^A01^ADT_A01|LOAD0001|P|2.5\r"
    "PID|1||000001^^^LOADFAC^MR||SAMPLE^PAT||19700101|U\r";

typedef struct {
    char *data;   /* framed bytes */
    size_t len;
    size_t id_at; /* with -u: where the ID_LEN bytes of MSH-10 start */
} frame_t;

/* With -u, MSH-10 of every message sent is made unique: "U", 6 digits of the
 * generator's pid, 9 digits of a counter (a listener keeping a journal would
 * otherwise take each message after the first for a retransmission). */
#define ID_LEN 16

enum { C_CONNECTING, C_SENDING, C_WAITING, C_DONE };

typedef struct {
    int fd;
    int state;
    size_t next_frame; /* index into frames of the message being sent */
    size_t sent;       /* bytes of the current frame written so far */
    int saw_fs;        /* the last byte read was FS */
    /* recognising "\rMSA|XX" in the ACK, to count AA against other codes */
    int msa_state;
    char code[2];
    int have_code;
    uint64_t t_sent; /* when the first byte of the current message was written */
    int want_out;    /* EPOLLOUT is registered */
    char *own;       /* with -u: this connection's copy of the frame being sent */
} conn_t;

static frame_t *frames;
static size_t nframes;
static conn_t *conns;
static int epfd;

static uint64_t *lat;  /* latencies in ns */
static size_t nlat, latcap;
static uint64_t code_aa, code_other, code_none;
static uint64_t failures; /* connections that broke or were closed by the server */
static int unique_ids;     /* -u */
static uint64_t serial;    /* messages sent, for -u */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s -p PORT [-c CONNS] [-d SECONDS] [-n COUNT] [-w WARMUP] [-m FILE]...\n"
            "  -p PORT     listener port on 127.0.0.1\n"
            "  -c CONNS    connections, one message in flight each (default 1)\n"
            "  -d SECONDS  measurement window after warm-up (default 5)\n"
            "  -n COUNT    end the window after COUNT ACKs (default: no limit)\n"
            "  -w WARMUP   seconds of warm-up, not recorded (default 1)\n"
            "  -m FILE     HL7 message to send (repeatable; framed here unless it starts with VT)\n"
            "  -u          a new MSH-10 (control id) for every message sent\n",
            prog);
    exit(2);
}

static void add_frame(const char *msg, size_t n) {
    frame_t f;
    if (n > 0 && msg[0] == VT) {
        f.data = malloc(n);
        if (!f.data) die("malloc");
        memcpy(f.data, msg, n);
        f.len = n;
    } else {
        /* CRLF -> CR, LF -> CR; then VT ... FS CR */
        f.data = malloc(n + 3);
        if (!f.data) die("malloc");
        size_t k = 0;
        f.data[k++] = VT;
        for (size_t i = 0; i < n; i++) {
            if (msg[i] == '\r' && i + 1 < n && msg[i + 1] == '\n') continue;
            f.data[k++] = msg[i] == '\n' ? '\r' : msg[i];
        }
        f.data[k++] = FS;
        f.data[k++] = CR;
        f.len = k;
    }
    f.id_at = 0;
    frames = realloc(frames, (nframes + 1) * sizeof *frames);
    if (!frames) die("realloc");
    frames[nframes++] = f;
}

static void load_file(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp) die(path);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 65536;
            buf = realloc(buf, cap);
            if (!buf) die("realloc");
        }
        size_t r = fread(buf + len, 1, cap - len, fp);
        if (r == 0) break;
        len += r;
    }
    if (ferror(fp)) die(path);
    fclose(fp);
    if (len == 0) {
        fprintf(stderr, "%s: empty message file\n", path);
        exit(2);
    }
    add_frame(buf, len);
    free(buf);
}

static void set_events(conn_t *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_out = want_out;
}

static void close_conn(conn_t *c, int failed) {
    if (c->state == C_DONE) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = C_DONE;
    if (failed) failures++;
}

/* For -u: give MSH-10 of every frame ID_LEN bytes, and note where they are. */
static void make_room_for_ids(void) {
    for (size_t i = 0; i < nframes; i++) {
        frame_t *f = &frames[i];
        if (f->len < 5 || memcmp(f->data + 1, "MSH", 3) != 0) {
            fprintf(stderr, "-u: message %zu does not start with MSH\n", i + 1);
            exit(2);
        }
        char sep = f->data[4];
        size_t start = 0, end, seen = 0;
        for (size_t k = 4; k < f->len && f->data[k] != CR; k++) {
            if (f->data[k] == sep && ++seen == 9) {
                start = k + 1;
                break;
            }
        }
        if (!start) {
            fprintf(stderr, "-u: message %zu has no MSH-10\n", i + 1);
            exit(2);
        }
        for (end = start; end < f->len && f->data[end] != sep && f->data[end] != CR; end++) {
        }
        char *data = malloc(f->len - (end - start) + ID_LEN);
        if (!data) die("malloc");
        memcpy(data, f->data, start);
        memset(data + start, '0', ID_LEN);
        memcpy(data + start + ID_LEN, f->data + end, f->len - end);
        free(f->data);
        f->len = f->len - (end - start) + ID_LEN;
        f->data = data;
        f->id_at = start;
    }
}

/* The bytes of the message a connection is sending. */
static const char *frame_data(conn_t *c) { return c->own ? c->own : frames[c->next_frame].data; }

/* Write as much of the current frame as the socket takes. */
static void pump_write(conn_t *c) {
    frame_t *f = &frames[c->next_frame];
    const char *data = frame_data(c);
    while (c->sent < f->len) {
        ssize_t w = send(c->fd, data + c->sent, f->len - c->sent, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_events(c, 1);
                return;
            }
            close_conn(c, 1);
            return;
        }
        c->sent += (size_t)w;
    }
    c->state = C_WAITING;
    set_events(c, 0);
}

static void start_message(conn_t *c, uint64_t t) {
    if (unique_ids) {
        frame_t *f = &frames[c->next_frame];
        char id[ID_LEN + 1];
        c->own = realloc(c->own, f->len);
        if (!c->own) die("realloc");
        memcpy(c->own, f->data, f->len);
        snprintf(id, sizeof id, "U%06u%09u", (unsigned)getpid() % 1000000u, (unsigned)(serial++ % 1000000000u));
        memcpy(c->own + f->id_at, id, ID_LEN);
    }
    c->state = C_SENDING;
    c->sent = 0;
    c->saw_fs = 0;
    c->msa_state = 0;
    c->have_code = 0;
    c->t_sent = t;
    pump_write(c);
}

static void record(uint64_t ns) {
    if (nlat == latcap) {
        latcap = latcap ? latcap * 2 : (1u << 16);
        lat = realloc(lat, latcap * sizeof *lat);
        if (!lat) die("realloc");
    }
    lat[nlat++] = ns;
}

/* Feed ACK bytes to the "\rMSA|" matcher; the two bytes after it are MSA-1. */
static void scan_msa(conn_t *c, unsigned char b) {
    static const char pat[] = "\rMSA|";
    if (c->have_code) return;
    if (c->msa_state >= 5) {
        c->code[c->msa_state - 5] = (char)b;
        if (++c->msa_state == 7) c->have_code = 1;
        return;
    }
    if (b == (unsigned char)pat[c->msa_state]) c->msa_state++;
    else c->msa_state = (b == '\r');
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile, in microseconds. */
static double pct_us(double p) {
    if (nlat == 0) return 0.0;
    size_t rank = (size_t)(p * (double)nlat + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > nlat) rank = nlat;
    return (double)lat[rank - 1] / 1000.0;
}

int main(int argc, char **argv) {
    int port = 0, nconn = 1, opt;
    double seconds = 5.0, warmup = 1.0;
    long long count = 0;
    while ((opt = getopt(argc, argv, "p:c:d:n:w:m:uh")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'n': count = atoll(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'm': load_file(optarg); break;
        case 'u': unique_ids = 1; break;
        default: usage(argv[0]);
        }
    }
    if (optind != argc || port <= 0 || port > 65535 || nconn < 1 || seconds <= 0 || warmup < 0 || count < 0)
        usage(argv[0]);
    if (nframes == 0) add_frame(BUILTIN_MESSAGE, sizeof BUILTIN_MESSAGE - 1);
    if (unique_ids) make_room_for_ids();
    signal(SIGPIPE, SIG_IGN);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    conns = calloc((size_t)nconn, sizeof *conns);
    if (!conns) die("calloc");

    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int open_conns = 0;
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->next_frame = (size_t)i % nframes;
        c->state = C_CONNECTING;
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) die("connect");
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        c->want_out = 1;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
        open_conns++;
    }

    uint64_t t_start = now_ns();
    uint64_t warm_end = t_start + (uint64_t)(warmup * 1e9);
    uint64_t window_end = warm_end + (uint64_t)(seconds * 1e9);
    uint64_t drain_end = 0;  /* set when the window closes */
    uint64_t window_closed_at = 0;
    int stopping = 0;
    uint64_t counted = 0;

    static unsigned char buf[1 << 16];
    struct epoll_event evs[512];

    while (open_conns > 0) {
        uint64_t t = now_ns();
        if (!stopping && t >= window_end) {
            stopping = 1;
            window_closed_at = window_end;
            drain_end = t + 2000000000ull;
        }
        if (stopping) {
            /* close connections that have nothing in flight */
            for (int i = 0; i < nconn; i++)
                if (conns[i].state == C_CONNECTING) { close_conn(&conns[i], 1); open_conns--; }
            if (t >= drain_end) {
                for (int i = 0; i < nconn; i++)
                    if (conns[i].state != C_DONE) { close_conn(&conns[i], 0); open_conns--; }
                break;
            }
        }
        uint64_t deadline = stopping ? drain_end : window_end;
        int timeout_ms = deadline > t ? (int)((deadline - t) / 1000000ull) + 1 : 0;
        int n = epoll_wait(epfd, evs, 512, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            if (c->state == C_DONE) continue;
            uint32_t e = evs[k].events;
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    errno = err;
                    perror("connect");
                    close_conn(c, 1);
                    open_conns--;
                    continue;
                }
                if (!(e & EPOLLOUT)) continue;
                if (stopping) { close_conn(c, 0); open_conns--; continue; }
                start_message(c, now_ns());
                if (c->state == C_DONE) open_conns--;
                continue;
            }
            if ((e & EPOLLOUT) && c->state == C_SENDING) {
                pump_write(c);
                if (c->state == C_DONE) { open_conns--; continue; }
            }
            if (!(e & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            for (;;) {
                ssize_t r = recv(c->fd, buf, sizeof buf, 0);
                if (r < 0) {
                    if (errno == EINTR) continue;
                    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                    close_conn(c, 1);
                    open_conns--;
                    break;
                }
                if (r == 0) {
                    /* the listener closed the connection */
                    close_conn(c, 1);
                    open_conns--;
                    break;
                }
                int finished = 0;
                for (ssize_t i = 0; i < r; i++) {
                    unsigned char b = buf[i];
                    scan_msa(c, b);
                    if (c->saw_fs && b == CR) {
                        /* one whole ACK frame */
                        uint64_t t1 = now_ns();
                        if (c->state != C_WAITING) {
                            /* an ACK before the whole message was written: a listener bug */
                            fprintf(stderr, "mllp_load: ACK arrived before the message was fully sent\n");
                        }
                        if (!stopping && t1 >= warm_end && t1 <= window_end) {
                            record(t1 - c->t_sent);
                            if (!c->have_code) code_none++;
                            else if (c->code[0] == 'A' && c->code[1] == 'A') code_aa++;
                            else code_other++;
                            counted++;
                            if (count > 0 && (long long)counted >= count) {
                                stopping = 1;
                                window_closed_at = t1;
                                drain_end = t1 + 2000000000ull;
                            }
                        }
                        c->saw_fs = 0;
                        if (stopping || t1 >= window_end) {
                            close_conn(c, 0);
                            open_conns--;
                            finished = 1;
                            break;
                        }
                        c->next_frame = (c->next_frame + 1) % nframes;
                        start_message(c, t1);
                        if (c->state == C_DONE) { open_conns--; finished = 1; break; }
                        continue;
                    }
                    c->saw_fs = (b == FS);
                }
                if (finished) break;
                if ((size_t)r < sizeof buf) break;
            }
        }
    }

    if (!window_closed_at) window_closed_at = now_ns() < window_end ? now_ns() : window_end;
    double window_s = window_closed_at > warm_end ? (double)(window_closed_at - warm_end) / 1e9 : 0.0;
    qsort(lat, nlat, sizeof *lat, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < nlat; i++) sum += (double)lat[i];
    size_t msg_bytes = 0;
    for (size_t i = 0; i < nframes; i++) msg_bytes += frames[i].len;
    printf("{\"tool\": \"hl7bridge-mllp_load\", \"port\": %d, \"connections\": %d, \"window_s\": %.3f, "
           "\"warmup_s\": %.3f, \"acked\": %zu, \"msgs_per_s\": %.1f, "
           "\"mean_us\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"max_us\": %.1f, \"ack_codes\": {\"AA\": %llu, \"other\": %llu, \"none\": %llu}, "
           "\"failed_connections\": %llu, \"messages\": %zu, \"mean_frame_bytes\": %zu}\n",
           port, nconn, window_s, warmup, nlat, window_s > 0 ? (double)nlat / window_s : 0.0,
           nlat ? sum / (double)nlat / 1000.0 : 0.0, pct_us(0.50), pct_us(0.90), pct_us(0.99), pct_us(0.999),
           nlat ? (double)lat[nlat - 1] / 1000.0 : 0.0, (unsigned long long)code_aa,
           (unsigned long long)code_other, (unsigned long long)code_none, (unsigned long long)failures, nframes,
           msg_bytes / nframes);
    return (nlat > 0 && failures == 0) ? 0 : 1;
}
