/* takdsr_client.c: implementation of takdsr_client.h with libzmq, msgpack-c and POSIX shared memory.
 * Section numbers in comments refer to docs/protocol.md. */
#define _DEFAULT_SOURCE /* getentropy, clock_gettime, shm_open */
#include "takdsr_client.h"

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <msgpack.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define SLOT_ALIGN 4096u /* section 6.2: slot starts are page-aligned */
#define DIM_MAX 65535u   /* section 3: a frame's width and height, at most */
#define SCALE_MAX 16u    /* section 3: welcome.scale, at most */
#define IPC_PATH_MAX 107 /* bytes of a Unix socket's path (sun_path holds 108 with its NUL) */
#define CLIENT_NAME_MAX 64 /* section 3, hello: characters (Unicode code points) of the client's name */
#define PROBE_EVERY_MS 1000 /* a wait on an ipc endpoint checks this often whether a daemon still listens there */

/* ZMQ_ROUTING_ID is libzmq 4.2.3's name for the option ZMQ_IDENTITY (the same number) of older releases. */
#ifndef ZMQ_ROUTING_ID
#define ZMQ_ROUTING_ID ZMQ_IDENTITY
#endif

struct pending { /* a submit whose outcome has not arrived */
    uint64_t req, frame;
    uint32_t session, slot;
};

struct ring { /* one mapped segment */
    uint8_t *base;
    size_t size, slot_stride;
};

struct takdsr_session {
    takdsr_client *client;
    uint32_t id;
    takdsr_geometry geom;
    struct ring in, out;
};

struct takdsr_client {
    void *ctx, *sock;
    int timeout_ms;
    char ipc_path[IPC_PATH_MAX + 1]; /* the socket file of an ipc:// endpoint (not an abstract one), else "" */
    uint64_t next_req;
    takdsr_error err;
    struct pending *pending; /* submits awaiting their done/error reply */
    size_t n_pending, cap_pending;
    takdsr_event *ready; /* outcomes that arrived while another reply was awaited, oldest first */
    size_t n_ready, cap_ready;
    takdsr_session **sessions; /* open sessions, freed by takdsr_client_free */
    size_t n_sessions, cap_sessions;
};

/* A decoded reply: the msgpack tree (owned by `up`; its str and bin objects point into `frame`, so both live until
 * reply_free) and its header. Never copied: a short frame's bytes live inside the zmq_msg_t itself. */
struct reply {
    zmq_msg_t frame;
    msgpack_unpacked up;
    const msgpack_object_map *map;
    uint64_t req;
    char type[16];
};

static const struct { const char *name; uint32_t channels; } FORMATS[] = {
    {"RGB8", 3}, {"BGR8", 3}, {"RGBA8", 4}, {"BGRA8", 4},
};

/* --- errors ------------------------------------------------------------------------------------------------------ */

static int fail(takdsr_client *c, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    c->err.status = status;
    c->err.code = 0;
    c->err.name[0] = '\0';
    vsnprintf(c->err.message, sizeof c->err.message, fmt, ap);
    va_end(ap);
    return status;
}

const takdsr_error *takdsr_last_error(const takdsr_client *c) { return &c->err; }

const char *takdsr_status_name(int status) {
    switch (status) {
    case TAKDSR_OK: return "OK";
    case TAKDSR_E_SYSTEM: return "SYSTEM";
    case TAKDSR_E_TIMEOUT: return "TIMEOUT";
    case TAKDSR_E_PROTOCOL: return "PROTOCOL";
    case TAKDSR_E_SERVER: return "SERVER";
    case TAKDSR_E_ARGUMENT: return "ARGUMENT";
    case TAKDSR_E_UNAVAILABLE: return "UNAVAILABLE";
    default: return "UNKNOWN";
    }
}

/* Grows *array (of `size`-byte items) to hold one more than *count; false when out of memory. */
static bool reserve_one(void **array, size_t *cap, size_t count, size_t size) {
    if (count < *cap) return true;
    size_t new_cap = *cap ? *cap * 2 : 8;
    void *grown = realloc(*array, new_cap * size);
    if (!grown) return false;
    *array = grown;
    *cap = new_cap;
    return true;
}

/* --- encoding (section 2) ---------------------------------------------------------------------------------------- */

struct msg {
    msgpack_sbuffer buf;
    msgpack_packer pk;
    int failed; /* any msgpack call failed (out of memory) */
};

static void pk_str(struct msg *m, const char *s) {
    size_t n = strlen(s);
    m->failed |= msgpack_pack_str(&m->pk, n) | msgpack_pack_str_body(&m->pk, s, n);
}

static void pk_uint(struct msg *m, const char *key, uint64_t value) {
    pk_str(m, key);
    m->failed |= msgpack_pack_uint64(&m->pk, value); /* msgpack-c picks the shortest integer encoding */
}

/* Starts a request map of `fields` keys besides the header keys v, type and req. */
static void msg_begin(struct msg *m, const char *type, uint64_t req, size_t fields) {
    msgpack_sbuffer_init(&m->buf);
    msgpack_packer_init(&m->pk, &m->buf, msgpack_sbuffer_write);
    m->failed = msgpack_pack_map(&m->pk, fields + 3);
    pk_uint(m, "v", TAKDSR_PROTOCOL_VERSION);
    pk_str(m, "type");
    pk_str(m, type);
    pk_uint(m, "req", req);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* zmq_send within the client's timeout. A signal (an engine's timer without SA_RESTART) interrupts a send that
 * waits for room; it is retried with the time left (ZMQ_SNDTIMEO would restart at every try), then EAGAIN. */
static int send_by_deadline(takdsr_client *c, const void *data, size_t size) {
    int64_t deadline = now_ms() + c->timeout_ms;
    int sent = zmq_send(c->sock, data, size, 0);
    while (sent < 0 && errno == EINTR) {
        int left = (int)(deadline - now_ms());
        if (left <= 0) {
            errno = EAGAIN;
            break;
        }
        zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &left, sizeof left);
        sent = zmq_send(c->sock, data, size, 0);
    }
    int saved_errno = errno;
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &c->timeout_ms, sizeof c->timeout_ms);
    errno = saved_errno;
    return sent;
}

/* Sends the message and frees its buffer. */
static int msg_send(takdsr_client *c, struct msg *m) {
    int rc = TAKDSR_OK;
    if (m->failed)
        rc = fail(c, TAKDSR_E_SYSTEM, "out of memory while encoding a message");
    else if (send_by_deadline(c, m->buf.data, m->buf.size) < 0)
        rc = fail(c, errno == EAGAIN ? TAKDSR_E_TIMEOUT : TAKDSR_E_SYSTEM, "cannot send to the daemon: %s",
                  zmq_strerror(errno));
    msgpack_sbuffer_destroy(&m->buf);
    return rc;
}

/* --- decoding ---------------------------------------------------------------------------------------------------- */

static const msgpack_object *field(const msgpack_object_map *map, const char *key) {
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->size; i++) {
        const msgpack_object *k = &map->ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0)
            return &map->ptr[i].val;
    }
    return NULL;
}

static bool get_u64(const msgpack_object_map *map, const char *key, uint64_t *out) {
    const msgpack_object *o = field(map, key);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return false;
    *out = o->via.u64;
    return true;
}

static bool get_u32(const msgpack_object_map *map, const char *key, uint32_t *out) {
    uint64_t v;
    if (!get_u64(map, key, &v) || v > UINT32_MAX) return false;
    *out = (uint32_t)v;
    return true;
}

/* Copies a str field into dst (truncated to cap - 1 bytes, NUL-terminated). */
static bool get_str(const msgpack_object_map *map, const char *key, char *dst, size_t cap) {
    const msgpack_object *o = field(map, key);
    if (!o || o->type != MSGPACK_OBJECT_STR) return false;
    size_t n = o->via.str.size < cap - 1 ? o->via.str.size : cap - 1;
    memcpy(dst, o->via.str.ptr, n);
    dst[n] = '\0';
    return true;
}

static const msgpack_object_map *get_map(const msgpack_object_map *map, const char *key) {
    const msgpack_object *o = field(map, key);
    return o && o->type == MSGPACK_OBJECT_MAP ? &o->via.map : NULL;
}

static void reply_free(struct reply *r) {
    msgpack_unpacked_destroy(&r->up);
    zmq_msg_close(&r->frame);
}

/* Decodes r->frame: a msgpack map with v = 1, a str type and a uint req, nothing after it. */
static int decode_reply(takdsr_client *c, struct reply *r) {
    const char *data = zmq_msg_data(&r->frame);
    size_t size = zmq_msg_size(&r->frame), offset = 0;
    msgpack_unpacked_init(&r->up);
    uint64_t version = 0;
    if (msgpack_unpack_next(&r->up, data, size, &offset) != MSGPACK_UNPACK_SUCCESS || offset != size ||
        r->up.data.type != MSGPACK_OBJECT_MAP) {
        msgpack_unpacked_destroy(&r->up);
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon sent a reply that is not one msgpack map (%zu bytes)", size);
    }
    r->map = &r->up.data.via.map;
    bool versioned = get_u64(r->map, "v", &version);
    if (versioned && version != TAKDSR_PROTOCOL_VERSION) {
        msgpack_unpacked_destroy(&r->up);
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon answered in protocol version %" PRIu64 "; this client speaks %d: "
                    "use a client of the daemon's version", version, TAKDSR_PROTOCOL_VERSION);
    }
    if (!versioned || !get_u64(r->map, "req", &r->req) ||
        !get_str(r->map, "type", r->type, sizeof r->type)) {
        msgpack_unpacked_destroy(&r->up);
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon's reply lacks a valid v/type/req header");
    }
    return TAKDSR_OK;
}

/* Fills c->err from an error reply. */
static int server_error(takdsr_client *c, const msgpack_object_map *map) {
    uint64_t code = TAKDSR_INTERNAL;
    get_u64(map, "code", &code);
    fail(c, TAKDSR_E_SERVER, "(no message)");
    c->err.code = code > 65535 ? TAKDSR_INTERNAL : (int)code;
    if (!get_str(map, "name", c->err.name, sizeof c->err.name)) snprintf(c->err.name, sizeof c->err.name, "?");
    get_str(map, "message", c->err.message, sizeof c->err.message);
    return TAKDSR_E_SERVER;
}

/* --- receiving and matching replies (section 1: replies are not in request order) -------------------------------- */

/* The socket file of an ipc:// endpoint, or NULL: another transport, Linux's abstract namespace (ipc://@name), or a
 * path longer than a Unix socket takes. */
static const char *ipc_socket_path(const char *endpoint) {
    if (strncmp(endpoint, "ipc://", 6) != 0) return NULL;
    const char *path = endpoint + 6;
    return path[0] != '@' && strlen(path) <= IPC_PATH_MAX ? path : NULL;
}

/* The errno of a non-blocking connect to the Unix socket file `path`: 0 when it connected, or when no socket could be
 * made to try. A probe costs a daemon little: it drops a peer that leaves before its greeting. */
static int connect_error(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    int why = connect(fd, (const struct sockaddr *)&addr, sizeof addr) == 0 ? 0 : errno;
    close(fd);
    return why;
}

/* Whether a daemon listens on the client's ipc:// socket file; TAKDSR_E_UNAVAILABLE (saying why) when the file does
 * not exist, or was left by a daemon that is no longer running (it refuses connections), where libzmq would retry in
 * silence until the timeout. TAKDSR_OK otherwise, also when the probe cannot tell (a tcp:// endpoint, a full backlog):
 * the wait goes on. */
static int probe_listener(takdsr_client *c) {
    if (!c->ipc_path[0]) return TAKDSR_OK;
    int why = connect_error(c->ipc_path);
    if (why == ENOENT)
        return fail(c, TAKDSR_E_UNAVAILABLE, "no daemon at %s: the socket file does not exist; start the daemon "
                    "(python -m upscaler_server) or check the endpoint", c->ipc_path);
    if (why == ECONNREFUSED)
        return fail(c, TAKDSR_E_UNAVAILABLE, "no daemon at %s: the socket file was left by a daemon that is no longer "
                    "running; start it again", c->ipc_path);
    return TAKDSR_OK;
}

/* Receives one reply frame within `deadline` (a now_ms() value, `waited_ms` after the wait began) and decodes it
 * into r. A signal that interrupts the wait (an engine's timer without SA_RESTART) is no error: it waits on. On an
 * ipc:// endpoint, each PROBE_EVERY_MS of silence checks that a daemon still listens (a killed daemon is noticed
 * within about a second, not after the timeout); shorter waits (a game loop polling with 0 ms) never probe. */
static int recv_reply(takdsr_client *c, int64_t deadline, int waited_ms, struct reply *r) {
    zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
    int ready;
    for (;;) {
        int64_t left = deadline - now_ms();
        int64_t slice = left > PROBE_EVERY_MS ? PROBE_EVERY_MS : left > 0 ? left : 0;
        ready = zmq_poll(&item, 1, (long)slice);
        if (ready < 0 && errno == EINTR) continue;
        if (ready != 0 || slice < PROBE_EVERY_MS) break;
        if (probe_listener(c) != TAKDSR_OK) return c->err.status;
    }
    if (ready < 0) return fail(c, TAKDSR_E_SYSTEM, "zmq_poll failed: %s", zmq_strerror(errno));
    if (ready == 0) return fail(c, TAKDSR_E_TIMEOUT, "no reply from the daemon within %d ms; is it running?",
                                waited_ms);
    zmq_msg_init(&r->frame);
    int received;
    while ((received = zmq_msg_recv(&r->frame, c->sock, 0)) < 0 && errno == EINTR) continue;
    if (received < 0) {
        zmq_msg_close(&r->frame);
        return fail(c, TAKDSR_E_SYSTEM, "cannot receive from the daemon: %s", zmq_strerror(errno));
    }
    bool more = zmq_msg_more(&r->frame);
    int rc = more ? fail(c, TAKDSR_E_PROTOCOL, "the daemon sent a multi-frame reply") : decode_reply(c, r);
    if (rc != TAKDSR_OK) zmq_msg_close(&r->frame);
    while (more) { /* drop the rest of a malformed reply */
        zmq_msg_t rest;
        zmq_msg_init(&rest);
        more = zmq_msg_recv(&rest, c->sock, 0) >= 0 && zmq_msg_more(&rest);
        zmq_msg_close(&rest);
    }
    return rc;
}

/* If r answers a pending submit, queues its outcome on c->ready and returns true. */
static bool take_outcome(takdsr_client *c, const struct reply *r) {
    size_t i = 0;
    while (i < c->n_pending && c->pending[i].req != r->req) i++;
    if (i == c->n_pending) return false;
    if (!reserve_one((void **)&c->ready, &c->cap_ready, c->n_ready, sizeof *c->ready)) return false;
    takdsr_event *ev = &c->ready[c->n_ready];
    memset(ev, 0, sizeof *ev);
    const struct pending p = c->pending[i];
    ev->session = p.session, ev->slot = p.slot, ev->frame = p.frame, ev->req = p.req;
    const msgpack_object_map *t = get_map(r->map, "timings");
    if (strcmp(r->type, "done") == 0 && t) {
        get_u64(t, "queue_us", &ev->timings.queue_us);
        get_u64(t, "copy_in_us", &ev->timings.copy_in_us);
        get_u64(t, "infer_us", &ev->timings.infer_us);
        get_u64(t, "copy_out_us", &ev->timings.copy_out_us);
        get_u64(t, "total_us", &ev->timings.total_us);
        ev->status = TAKDSR_OK;
    } else {
        takdsr_error saved = c->err;
        ev->status = strcmp(r->type, "error") == 0
                         ? server_error(c, r->map)
                         : fail(c, TAKDSR_E_PROTOCOL, "a %s reply answered a submit", r->type);
        ev->error = c->err;
        c->err = saved;
    }
    c->pending[i] = c->pending[--c->n_pending];
    c->n_ready++;
    return true;
}

/* A reply no call waits for (one given up on) that is not a frame's outcome. A late `opened` (a takdsr_session_open
 * that timed out while the daemon stalled) is a session nobody holds, which kept its shared memory until its lease
 * ended: it is closed, without waiting (its `closed` is dropped in turn). Anything else is dropped. */
static void drop_reply(takdsr_client *c, const struct reply *r) {
    uint64_t session;
    if (strcmp(r->type, "opened") != 0 || !get_u64(r->map, "session", &session) || session > UINT32_MAX) return;
    struct msg m;
    takdsr_error saved = c->err;
    msg_begin(&m, "close", c->next_req++, 1);
    pk_uint(&m, "session", session);
    msg_send(c, &m); /* best effort: its lease ends it otherwise */
    c->err = saved;
}

/* Sends m (request id req) and waits for the reply of type `expected`; other replies are kept or dropped. On
 * TAKDSR_OK the caller owns r and must reply_free(r). */
static int request(takdsr_client *c, struct msg *m, uint64_t req, const char *expected, struct reply *r) {
    int rc = msg_send(c, m);
    int64_t deadline = now_ms() + c->timeout_ms;
    while (rc == TAKDSR_OK && (rc = recv_reply(c, deadline, c->timeout_ms, r)) == TAKDSR_OK) {
        /* An error with req 0 answers a message whose req the daemon could not read (MALFORMED, section 1): this
         * one, the only request waiting; submits, sent without waiting, are well formed by construction. */
        if (r->req == req || (r->req == 0 && strcmp(r->type, "error") == 0)) {
            if (strcmp(r->type, expected) == 0) return TAKDSR_OK;
            rc = strcmp(r->type, "error") == 0 ? server_error(c, r->map)
                                                : fail(c, TAKDSR_E_PROTOCOL, "expected %s, got %s", expected, r->type);
        } else if (!take_outcome(c, r)) { /* a done for a submit, or else a late reply to a request given up on */
            drop_reply(c, r);
        }
        reply_free(r);
    }
    return rc;
}

/* --- client ------------------------------------------------------------------------------------------------------ */

/* Whether the default endpoint's folder ($XDG_RUNTIME_DIR/takdsr or /tmp/takdsr-$UID) is private: a directory, not
 * a link, owned by this process's effective uid, with mode 0700 (no group or other bits), as the daemon requires of it
 * (upscaler_server/config.py, runtime_dir). Anyone may make /tmp/takdsr-<another user's uid> first and serve a socket
 * in it, which would then get that user's frames. A missing folder is created 0700, so nobody else can make it while
 * the client waits for a daemon. Says why on stderr when it is not private. */
static bool private_folder(const char *path) {
    struct stat st;
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "takdsr: cannot create the runtime directory %s: %s\n", path, strerror(errno));
        return false;
    }
    if (lstat(path, &st) != 0) {
        fprintf(stderr, "takdsr: cannot look at the runtime directory %s: %s\n", path, strerror(errno));
        return false;
    }
    unsigned uid = (unsigned)geteuid();
    if (S_ISDIR(st.st_mode) && st.st_uid == uid && (st.st_mode & 077) == 0) return true;
    const char *kind = S_ISDIR(st.st_mode) ? "a directory" : S_ISLNK(st.st_mode) ? "a symbolic link" : "no directory";
    bool ours = st.st_uid == uid;
    fprintf(stderr, "takdsr: %s must be a directory owned by uid %u with mode 0700, but it is %s owned by uid %u with "
            "mode %04o; %s\n", path, uid, kind, (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777),
            ours ? "remove it, or set XDG_RUNTIME_DIR"
                 : "another user made it and only they (or an administrator) can remove it: do not use a daemon "
                   "there; set XDG_RUNTIME_DIR to a private folder of yours or TAKDSR_UPSCALER_ENDPOINT to an endpoint "
                   "of your own, or pass one (-e)");
    return false;
}

/* The default endpoint of section 1 into dst. The folder of the per-user socket is checked (private_folder); an
 * endpoint from $TAKDSR_UPSCALER_ENDPOINT, chosen by the user, is taken as it is. False after saying why on stderr. */
static bool default_endpoint(char *dst, size_t cap) {
    const char *env = getenv("TAKDSR_UPSCALER_ENDPOINT");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    char folder[IPC_PATH_MAX + 1]; /* longer ones are refused below */
    if (env && *env) {
        snprintf(dst, cap, "%s", env);
        return true;
    }
    int n = xdg && *xdg ? snprintf(folder, sizeof folder, "%s/takdsr", xdg)
                        : snprintf(folder, sizeof folder, "/tmp/takdsr-%u", (unsigned)getuid());
    size_t length = n < 0 ? SIZE_MAX : (size_t)n + strlen("/upscaler.sock");
    if (length > IPC_PATH_MAX) { /* only a long $XDG_RUNTIME_DIR makes it so: name that, not a path nobody typed */
        fprintf(stderr, "takdsr: the default socket path %s/takdsr/upscaler.sock is %zu bytes long, more than a Unix "
                "socket's %d, because $XDG_RUNTIME_DIR is long: set TAKDSR_UPSCALER_ENDPOINT to a shorter ipc:// "
                "path (or pass one, -e), or use a shorter XDG_RUNTIME_DIR\n", xdg ? xdg : "", length, IPC_PATH_MAX);
        return false;
    }
    if (!private_folder(folder)) return false;
    snprintf(dst, cap, "ipc://%s/upscaler.sock", folder); /* fits: its path is at most IPC_PATH_MAX bytes */
    return true;
}

/* Whose `path` is, or the first folder above it that this process cannot enter, with its mode, into dst. */
static void describe_owner(const char *path, char *dst, size_t cap) {
    char at[sizeof ((struct sockaddr_un *)NULL)->sun_path];
    snprintf(at, sizeof at, "%s", path);
    struct stat st;
    for (bool whole = true;; whole = false) {
        if (lstat(at, &st) == 0) {
            snprintf(dst, cap, "%s%s belongs to uid %u (mode %04o)", whole ? "it" : "its folder ", whole ? "" : at,
                     (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
            return;
        }
        char *slash = strrchr(at, '/');
        if (!slash || slash == at) break;
        *slash = '\0';
    }
    snprintf(dst, cap, "it belongs to another user");
}

/* Whether this process may connect to an ipc endpoint's socket file. Another user's (0600, in a 0700 folder) refuses
 * it with EACCES, which libzmq keeps retrying in silence until the reply timeout runs out: here it fails at once,
 * naming the owner. Anything else (no file yet, a full backlog) is left to libzmq. Says why on stderr. */
static bool ipc_permitted(const char *endpoint) {
    const char *path = ipc_socket_path(endpoint);
    if (!path || connect_error(path) != EACCES) return true;
    char owner[IPC_PATH_MAX + 65];
    describe_owner(path, owner, sizeof owner);
    fprintf(stderr, "takdsr: permission denied on %s: %s and this process runs as uid %u; a daemon serves only its "
            "own user's clients: start one of your own, or run as the daemon's user\n", path, owner,
            (unsigned)geteuid());
    return false;
}

takdsr_client *takdsr_client_new(const char *endpoint, int timeout_ms) {
    char where[1024];
    if (!endpoint) {
        if (!default_endpoint(where, sizeof where)) return NULL;
        endpoint = where;
    }
    if (!ipc_permitted(endpoint)) return NULL;
    takdsr_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 10000;
    c->next_req = 1;
    const char *path = ipc_socket_path(endpoint);
    if (path) snprintf(c->ipc_path, sizeof c->ipc_path, "%s", path);
    c->ctx = zmq_ctx_new();
    c->sock = c->ctx ? zmq_socket(c->ctx, ZMQ_DEALER) : NULL;
    /* A fixed routing id (first byte not 0) lets a reopened socket receive late replies (section 1). */
    unsigned char id[16] = {0x01};
    int linger = 0, ipv6 = 1; /* ipv6: a daemon on tcp://[::1]:PORT; IPv4 and ipc work either way */
    if (!c->sock || getentropy(id + 1, sizeof id - 1) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_ROUTING_ID, id, sizeof id) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_IPV6, &ipv6, sizeof ipv6) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &c->timeout_ms, sizeof c->timeout_ms) != 0 ||
        zmq_connect(c->sock, endpoint) != 0) {
        fprintf(stderr, "takdsr: cannot connect to %s: %s\n", endpoint, zmq_strerror(errno));
        takdsr_client_free(c);
        return NULL;
    }
    return c;
}

static void unmap_session(takdsr_session *s) {
    if (s->in.base) munmap(s->in.base, s->in.size);
    if (s->out.base) munmap(s->out.base, s->out.size);
    free(s);
}

void takdsr_client_free(takdsr_client *c) {
    if (!c) return;
    for (size_t i = 0; i < c->n_sessions; i++) unmap_session(c->sessions[i]);
    if (c->sock) zmq_close(c->sock);
    if (c->ctx) zmq_ctx_term(c->ctx);
    free(c->sessions);
    free(c->pending);
    free(c->ready);
    free(c);
}

/* The number of code points of `text` when it is UTF-8 as the daemon's decoder takes it (no overlong forms, no
 * surrogates, nothing past U+10FFFF), else -1. */
static long utf8_length(const char *text) {
    const unsigned char *u = (const unsigned char *)text;
    long count = 0;
    while (*u) {
        unsigned lead = *u++;
        int more = lead < 0x80             ? 0
                   : (lead & 0xE0) == 0xC0 ? 1
                   : (lead & 0xF0) == 0xE0 ? 2
                   : (lead & 0xF8) == 0xF0 ? 3
                                           : -1;
        if (more < 0) return -1;
        uint32_t point = more == 0 ? lead : lead & (0x3Fu >> more);
        for (int i = 0; i < more; i++, u++) {
            if ((*u & 0xC0) != 0x80) return -1;
            point = point << 6 | (*u & 0x3Fu);
        }
        static const uint32_t least[] = {0, 0x80, 0x800, 0x10000};
        if (point < least[more] || point > 0x10FFFF || (point >= 0xD800 && point <= 0xDFFF)) return -1;
        count++;
    }
    return count;
}

int takdsr_hello(takdsr_client *c, const char *client_name, takdsr_info *info) {
    long name_length = client_name ? utf8_length(client_name) : -1;
    if (name_length < 0 || name_length > CLIENT_NAME_MAX)
        return fail(c, TAKDSR_E_ARGUMENT, "the client name must be UTF-8 text of at most %d characters%s",
                    CLIENT_NAME_MAX, client_name ? "" : " (not NULL)");
    if (probe_listener(c) != TAKDSR_OK) return c->err.status; /* at once, not after the timeout */
    struct msg m;
    struct reply r;
    uint64_t req = c->next_req++;
    msg_begin(&m, "hello", req, 1);
    pk_str(&m, "client");
    pk_str(&m, client_name);
    int rc = request(c, &m, req, "welcome", &r);
    if (rc != TAKDSR_OK) return rc;
    memset(info, 0, sizeof *info);
    const msgpack_object *rw = field(r.map, "random_weights");
    bool ok = get_str(r.map, "server", info->server, sizeof info->server) &&
              get_str(r.map, "instance", info->instance, sizeof info->instance) &&
              get_str(r.map, "model", info->model, sizeof info->model) &&
              get_str(r.map, "device", info->device, sizeof info->device) &&
              get_str(r.map, "precision", info->precision, sizeof info->precision) &&
              get_u32(r.map, "scale", &info->scale) && get_u32(r.map, "min_size", &info->min_size) &&
              get_u32(r.map, "max_width", &info->max_width) && get_u32(r.map, "max_height", &info->max_height) &&
              get_u64(r.map, "max_pixels", &info->max_pixels) && get_u32(r.map, "max_slots", &info->max_slots) &&
              get_u32(r.map, "max_sessions", &info->max_sessions) && get_u32(r.map, "max_queue", &info->max_queue) &&
              get_u64(r.map, "lease_ms", &info->lease_ms) && get_u64(r.map, "heartbeat_ms", &info->heartbeat_ms) &&
              rw && rw->type == MSGPACK_OBJECT_BOOLEAN;
    if (rw && rw->type == MSGPACK_OBJECT_BOOLEAN) info->random_weights = rw->via.boolean;
    reply_free(&r);
    return ok ? TAKDSR_OK : fail(c, TAKDSR_E_PROTOCOL, "the welcome reply lacks a documented key");
}

int takdsr_ping(takdsr_client *c, const uint32_t *sessions, size_t n, bool *alive) {
    if (n > 256) return fail(c, TAKDSR_E_ARGUMENT, "ping lists at most 256 sessions, got %zu", n);
    struct msg m;
    struct reply r;
    uint64_t req = c->next_req++;
    msg_begin(&m, "ping", req, 1);
    pk_str(&m, "sessions");
    m.failed |= msgpack_pack_array(&m.pk, n);
    for (size_t i = 0; i < n; i++) m.failed |= msgpack_pack_uint32(&m.pk, sessions[i]);
    int rc = request(c, &m, req, "pong", &r);
    if (rc != TAKDSR_OK) return rc;
    const msgpack_object *list = field(r.map, "sessions");
    rc = list && list->type == MSGPACK_OBJECT_ARRAY ? TAKDSR_OK
                                                    : fail(c, TAKDSR_E_PROTOCOL, "pong without a sessions array");
    for (size_t i = 0; rc == TAKDSR_OK && alive && i < n; i++) {
        alive[i] = false;
        for (uint32_t j = 0; j < list->via.array.size; j++) {
            const msgpack_object *o = &list->via.array.ptr[j];
            alive[i] |= o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 == sessions[i];
        }
    }
    reply_free(&r);
    return rc;
}

int takdsr_stats(takdsr_client *c, takdsr_statistics *stats) {
    struct msg m;
    struct reply r;
    uint64_t req = c->next_req++;
    msg_begin(&m, "stats", req, 0);
    int rc = request(c, &m, req, "statistics", &r);
    if (rc != TAKDSR_OK) return rc;
    memset(stats, 0, sizeof *stats);
    bool ok = get_str(r.map, "instance", stats->instance, sizeof stats->instance) &&
              get_u64(r.map, "uptime_ms", &stats->uptime_ms) && get_u32(r.map, "sessions", &stats->sessions) &&
              get_u32(r.map, "queued", &stats->queued) && get_u64(r.map, "frames_done", &stats->frames_done) &&
              get_u64(r.map, "frames_failed", &stats->frames_failed) &&
              get_u64(r.map, "frames_busy", &stats->frames_busy) &&
              get_u32(r.map, "recent_frames", &stats->recent_frames) &&
              get_u64(r.map, "total_us_p50", &stats->total_us_p50) &&
              get_u64(r.map, "total_us_p99", &stats->total_us_p99) &&
              get_u64(r.map, "infer_us_p50", &stats->infer_us_p50) &&
              get_u64(r.map, "infer_us_p99", &stats->infer_us_p99);
    reply_free(&r);
    return ok ? TAKDSR_OK : fail(c, TAKDSR_E_PROTOCOL, "the statistics reply lacks a documented key");
}

/* --- sessions ---------------------------------------------------------------------------------------------------- */

/* Whether `name` is what a daemon of this user calls session `session`'s `kind` segment (section 6.1):
 * /takdsr-<uid>-<daemon pid>-<session as 8 hex digits>-<kind>. Checked before mapping it: a process that answers in
 * the daemon's place (one that took a tcp port first) could otherwise name another application's segment of this
 * user, private as the daemon's are, and the client would write its frames into it. */
static bool daemon_segment_name(const char *name, uint32_t session, const char *kind) {
    char head[32], tail[32];
    snprintf(head, sizeof head, "/takdsr-%u-", (unsigned)geteuid());
    snprintf(tail, sizeof tail, "-%08x-%s", (unsigned)session, kind);
    size_t n = strlen(name), n_head = strlen(head), n_tail = strlen(tail);
    if (n <= n_head + n_tail || strncmp(name, head, n_head) != 0 || strcmp(name + n - n_tail, tail) != 0) return false;
    for (size_t i = n_head; i < n - n_tail; i++)
        if (name[i] < '0' || name[i] > '9') return false;
    return true;
}

/* Checks a segment map against the naming of section 6.1 and the layout of section 6.2, and maps it. */
static int map_ring(takdsr_client *c, const msgpack_object_map *seg, uint32_t session, const char *kind,
                    uint32_t width, uint32_t height, const takdsr_geometry *g, struct ring *ring) {
    char name[256];
    uint64_t size, stride, slot_bytes, row_stride;
    if (!seg || !get_str(seg, "name", name, sizeof name) || !get_u64(seg, "size", &size) ||
        !get_u64(seg, "slot_stride", &stride) || !get_u64(seg, "slot_bytes", &slot_bytes) ||
        !get_u64(seg, "row_stride", &row_stride))
        return fail(c, TAKDSR_E_PROTOCOL, "the opened reply has an incomplete segment map");
    if (!daemon_segment_name(name, session, kind))
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon named %s as session %u's %sput segment, where a daemon of this "
                    "user (uid %u) names it /takdsr-%u-<daemon pid>-%08x-%s: refused, as whatever answered may be no "
                    "upscaler daemon, or another user's", name, (unsigned)session, kind, (unsigned)geteuid(),
                    (unsigned)geteuid(), (unsigned)session, kind);
    /* width, height <= DIM_MAX * SCALE_MAX (read_opened) and 4 channels keep every product below 2^62; the total
     * must still fit this process's address space */
    uint64_t want_row = (uint64_t)width * g->channels, want_bytes = want_row * height;
    uint64_t want_stride = (want_bytes + SLOT_ALIGN - 1) / SLOT_ALIGN * SLOT_ALIGN;
    if (row_stride != want_row || slot_bytes != want_bytes || stride != want_stride || size != stride * g->slots ||
        size > SIZE_MAX)
        return fail(c, TAKDSR_E_PROTOCOL, "segment %s has a layout that section 6.2 does not allow", name);
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        int err = errno;
        return fail(c, TAKDSR_E_SYSTEM, "shm_open(%s): %s%s", name, strerror(err),
                    err == EACCES ? ": the segment is another user's, and a daemon serves only its own user's clients"
                                  : "");
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return fail(c, TAKDSR_E_SYSTEM, "fstat(%s): %s", name, strerror(err));
    }
    /* section 6.1: the daemon makes its segments 0600, as its own user, so only clients of that user map them; root
     * could map any user's, and would then hand its frames to another user's daemon */
    if (st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
        close(fd);
        return fail(c, TAKDSR_E_PROTOCOL, "segment %s belongs to uid %u with mode %04o, and this client runs as uid %u: "
                    "a daemon serves only its own user's clients (through segments of mode 0600); run the client as "
                    "the daemon's user, or start a daemon of your own", name, (unsigned)st.st_uid,
                    (unsigned)(st.st_mode & 07777), (unsigned)geteuid());
    }
    if ((uint64_t)st.st_size < size) { /* mapping it would fault on the first access past its end */
        close(fd);
        return fail(c, TAKDSR_E_PROTOCOL, "segment %s holds %lld bytes, the opened reply says %llu", name,
                    (long long)st.st_size, (unsigned long long)size);
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) return fail(c, TAKDSR_E_SYSTEM, "cannot map %s (%llu bytes): %s", name,
                                     (unsigned long long)size, strerror(err));
    ring->base = p, ring->size = size, ring->slot_stride = stride;
    return TAKDSR_OK;
}

/* The opened reply, checked against the request (`width` x `height`, `slots`, s->geom.format): a caller sizes its
 * frames and per-slot state by what it asked for, so a daemon's other size or count would overrun them. */
static int read_opened(takdsr_client *c, const struct reply *r, uint32_t width, uint32_t height, uint32_t slots,
                       takdsr_session *s) {
    takdsr_geometry *g = &s->geom;
    char format[sizeof g->format];
    if (!get_u32(r->map, "session", &s->id) || !get_u32(r->map, "width", &g->width) ||
        !get_u32(r->map, "height", &g->height) || !get_u32(r->map, "out_width", &g->out_width) ||
        !get_u32(r->map, "out_height", &g->out_height) || !get_u32(r->map, "slots", &g->slots) ||
        !get_str(r->map, "format", format, sizeof format))
        return fail(c, TAKDSR_E_PROTOCOL, "the opened reply lacks a documented key");
    if (g->slots != slots || g->slots > TAKDSR_MAX_SLOTS)
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon opened %u slots where %u were asked for (at most %d)", g->slots,
                    slots, TAKDSR_MAX_SLOTS);
    if (g->width != width || g->height != height || strcmp(format, g->format) != 0)
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon opened %ux%u %s frames where %ux%u %s were asked for",
                    g->width, g->height, format, width, height, g->format);
    /* the output is the input times the daemon's scale, one whole factor of at most 16 (welcome.scale) */
    uint32_t scale = width ? g->out_width / width : 0;
    if (width > DIM_MAX || height > DIM_MAX || scale < 1 || scale > SCALE_MAX || g->out_width != width * scale ||
        g->out_height != height * scale)
        return fail(c, TAKDSR_E_PROTOCOL, "the daemon opened %ux%u -> %ux%u frames: not one whole scale of 1 to %d",
                    width, height, g->out_width, g->out_height, SCALE_MAX);
    g->in_row_stride = (size_t)g->width * g->channels;
    g->in_slot_bytes = g->in_row_stride * g->height;
    g->out_row_stride = (size_t)g->out_width * g->channels;
    g->out_slot_bytes = g->out_row_stride * g->out_height;
    int rc = map_ring(c, get_map(r->map, "input"), s->id, "in", g->width, g->height, g, &s->in);
    return rc ? rc : map_ring(c, get_map(r->map, "output"), s->id, "out", g->out_width, g->out_height, g, &s->out);
}

static int send_close(takdsr_client *c, uint32_t session) {
    struct msg m;
    struct reply r;
    uint64_t req = c->next_req++;
    msg_begin(&m, "close", req, 1);
    pk_uint(&m, "session", session);
    int rc = request(c, &m, req, "closed", &r);
    if (rc == TAKDSR_OK) reply_free(&r);
    return rc;
}

int takdsr_session_open(takdsr_client *c, uint32_t width, uint32_t height, const char *format, uint32_t slots,
                        takdsr_session **out) {
    *out = NULL;
    takdsr_session *s = calloc(1, sizeof *s);
    if (!s || !reserve_one((void **)&c->sessions, &c->cap_sessions, c->n_sessions, sizeof *c->sessions)) {
        free(s);
        return fail(c, TAKDSR_E_SYSTEM, "out of memory");
    }
    s->client = c;
    for (size_t i = 0; i < sizeof FORMATS / sizeof *FORMATS; i++)
        if (strcmp(format, FORMATS[i].name) == 0) s->geom.channels = FORMATS[i].channels;
    snprintf(s->geom.format, sizeof s->geom.format, "%s", format);
    struct msg m;
    struct reply r;
    uint64_t req = c->next_req++;
    msg_begin(&m, "open", req, 4);
    pk_uint(&m, "width", width);
    pk_uint(&m, "height", height);
    pk_str(&m, "format");
    pk_str(&m, format);
    pk_uint(&m, "slots", slots);
    int rc = s->geom.channels ? request(c, &m, req, "opened", &r)
                              : (msgpack_sbuffer_destroy(&m.buf),
                                 fail(c, TAKDSR_E_ARGUMENT, "unknown pixel format %s; use RGB8, BGR8, RGBA8 or BGRA8",
                                      format));
    if (rc != TAKDSR_OK) {
        free(s);
        return rc;
    }
    rc = read_opened(c, &r, width, height, slots, s);
    reply_free(&r);
    if (rc != TAKDSR_OK) {
        takdsr_error saved = c->err;
        if (s->id) send_close(c, s->id); /* best effort: otherwise its lease expires */
        c->err = saved;
        unmap_session(s);
        return rc;
    }
    c->sessions[c->n_sessions++] = s;
    *out = s;
    return TAKDSR_OK;
}

int takdsr_session_close(takdsr_session *s) {
    takdsr_client *c = s->client;
    int rc = send_close(c, s->id);
    if (rc == TAKDSR_E_SERVER && c->err.code == TAKDSR_UNKNOWN_SESSION) rc = TAKDSR_OK; /* expired already */
    takdsr_session_drop(s);
    return rc;
}

void takdsr_session_drop(takdsr_session *s) {
    takdsr_client *c = s->client;
    for (size_t i = 0; i < c->n_pending;) /* frames of a closed session get no reply (section 3, close) */
        if (c->pending[i].session == s->id) c->pending[i] = c->pending[--c->n_pending];
        else i++;
    size_t kept = 0; /* and those that came before it closed are nobody's now: a later wait must not return them */
    for (size_t i = 0; i < c->n_ready; i++)
        if (c->ready[i].session != s->id) c->ready[kept++] = c->ready[i];
    c->n_ready = kept;
    for (size_t i = 0; i < c->n_sessions; i++)
        if (c->sessions[i] == s) c->sessions[i] = c->sessions[--c->n_sessions];
    unmap_session(s);
}

uint32_t takdsr_session_id(const takdsr_session *s) { return s->id; }
const takdsr_geometry *takdsr_session_geometry(const takdsr_session *s) { return &s->geom; }

uint8_t *takdsr_session_input(takdsr_session *s, uint32_t slot) {
    return slot < s->geom.slots ? s->in.base + (size_t)slot * s->in.slot_stride : NULL;
}

const uint8_t *takdsr_session_output(const takdsr_session *s, uint32_t slot) {
    return slot < s->geom.slots ? s->out.base + (size_t)slot * s->out.slot_stride : NULL;
}

/* --- frames ------------------------------------------------------------------------------------------------------ */

int takdsr_submit(takdsr_session *s, uint32_t slot, uint64_t frame) {
    takdsr_client *c = s->client;
    if (slot >= s->geom.slots) return fail(c, TAKDSR_E_ARGUMENT, "slot %u out of range [0, %u)", slot, s->geom.slots);
    if (!reserve_one((void **)&c->pending, &c->cap_pending, c->n_pending, sizeof *c->pending))
        return fail(c, TAKDSR_E_SYSTEM, "out of memory");
    struct msg m;
    uint64_t req = c->next_req++;
    msg_begin(&m, "submit", req, 3);
    pk_uint(&m, "session", s->id);
    pk_uint(&m, "slot", slot);
    pk_uint(&m, "frame", frame);
    int rc = msg_send(c, &m);
    if (rc == TAKDSR_OK) c->pending[c->n_pending++] = (struct pending){req, frame, s->id, slot};
    return rc;
}

size_t takdsr_pending(const takdsr_client *c) { return c->n_pending + c->n_ready; }

int takdsr_wait(takdsr_client *c, int timeout_ms, takdsr_event *ev) {
    if (c->n_ready == 0 && c->n_pending == 0) return fail(c, TAKDSR_E_ARGUMENT, "no frame was submitted");
    int wait_ms = timeout_ms < 0 ? c->timeout_ms : timeout_ms;
    int64_t deadline = now_ms() + wait_ms;
    while (c->n_ready == 0) {
        struct reply r;
        int rc = recv_reply(c, deadline, wait_ms, &r);
        if (rc != TAKDSR_OK) return rc;
        if (!take_outcome(c, &r)) drop_reply(c, &r); /* anything else answers a request given up on */
        reply_free(&r);
    }
    *ev = c->ready[0];
    memmove(c->ready, c->ready + 1, --c->n_ready * sizeof *c->ready);
    return TAKDSR_OK;
}
