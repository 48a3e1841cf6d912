/* takdsr_client: a small C11 client for the TAKDSR upscaler daemon, protocol version 1 (docs/protocol.md).
 *
 * Control messages: msgpack maps over a ZeroMQ DEALER socket. Pixels: the session's two POSIX shared-memory rings,
 * mapped here with shm_open + mmap. One client is one socket: not thread-safe, use one client per thread.
 *
 *   takdsr_client *c = takdsr_client_new(NULL, 10000);           // NULL: the default endpoint of the doc
 *   takdsr_info info;  takdsr_hello(c, "my-engine", &info);
 *   takdsr_session *s; takdsr_session_open(c, 1280, 720, "RGBA8", 3, &s);
 *   memcpy(takdsr_session_input(s, 0), frame, takdsr_session_geometry(s)->in_slot_bytes);
 *   takdsr_submit(s, 0, 42);
 *   takdsr_event ev;   takdsr_wait(c, -1, &ev);                   // ev.slot 0 done: read takdsr_session_output(s, 0)
 *   takdsr_session_close(s);  takdsr_client_free(c);
 *
 * Every function returning int returns TAKDSR_OK (0) or a negative TAKDSR_E_* status; after a failure,
 * takdsr_last_error() says what happened (for TAKDSR_E_SERVER: the daemon's error code, name and message).
 */
#ifndef TAKDSR_CLIENT_H
#define TAKDSR_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TAKDSR_PROTOCOL_VERSION 1
#define TAKDSR_MAX_SLOTS 64 /* slots per session, at most (section 3, open) */

enum takdsr_status {
    TAKDSR_OK = 0,
    TAKDSR_E_SYSTEM = -1,   /* an OS or libzmq call failed (out of memory, shm_open, mmap, socket) */
    TAKDSR_E_TIMEOUT = -2,  /* no reply within the timeout; the daemon may be down or overloaded */
    TAKDSR_E_PROTOCOL = -3, /* the daemon's reply breaks docs/protocol.md (a bug on one side) */
    TAKDSR_E_SERVER = -4,   /* the daemon answered with an error reply: see takdsr_error.code */
    TAKDSR_E_ARGUMENT = -5, /* a bad argument (slot out of range, unknown format, ...) caught locally */
    TAKDSR_E_UNAVAILABLE = -6, /* no daemon listens on the ipc:// endpoint: its socket file is missing, or was left
                                  by a daemon that is no longer running (found at once, or within a second of a wait) */
};

/* Error codes of the daemon's error replies (docs/protocol.md section 7). Unknown codes mean INTERNAL. */
enum takdsr_error_code {
    TAKDSR_MALFORMED = 1,
    TAKDSR_VERSION_MISMATCH = 2,
    TAKDSR_UNKNOWN_TYPE = 3,
    TAKDSR_INVALID_FIELD = 4,
    TAKDSR_UNKNOWN_SESSION = 10,
    TAKDSR_SLOT_OUT_OF_RANGE = 11,
    TAKDSR_SLOT_IN_FLIGHT = 12,
    TAKDSR_SIZE_TOO_LARGE = 13,
    TAKDSR_SIZE_TOO_SMALL = 14,
    TAKDSR_UNSUPPORTED_FORMAT = 15,
    TAKDSR_RESOURCE_LIMIT = 16,
    TAKDSR_BUSY = 20,
    TAKDSR_SHUTTING_DOWN = 21,
    TAKDSR_SHM_ERROR = 30,
    TAKDSR_INFERENCE_ERROR = 31,
    TAKDSR_INTERNAL = 99,
};

typedef struct takdsr_error {
    int status;         /* a takdsr_status */
    int code;           /* TAKDSR_E_SERVER: the daemon's error code; otherwise 0 */
    char name[65];      /* TAKDSR_E_SERVER: the code's name, e.g. "BUSY" */
    char message[1025]; /* what happened and what to do */
} takdsr_error;

typedef struct takdsr_info { /* the welcome reply */
    char server[65], instance[65], model[129], device[65], precision[17];
    uint32_t scale;
    bool random_weights;
    uint32_t min_size, max_width, max_height, max_slots, max_sessions, max_queue;
    uint64_t max_pixels, lease_ms, heartbeat_ms;
} takdsr_info;

typedef struct takdsr_statistics { /* the statistics reply: counts since the daemon started, its latest frames' times */
    char instance[65];
    uint64_t uptime_ms, frames_done, frames_failed, frames_busy;
    uint32_t sessions, queued, recent_frames;
    uint64_t total_us_p50, total_us_p99, infer_us_p50, infer_us_p99;
} takdsr_statistics;

typedef struct takdsr_timings {
    uint64_t queue_us, copy_in_us, infer_us, copy_out_us, total_us;
} takdsr_timings;

typedef struct takdsr_geometry { /* a session's frames and rings */
    uint32_t width, height, out_width, out_height, channels, slots;
    size_t in_row_stride, in_slot_bytes, out_row_stride, out_slot_bytes;
    char format[17];
} takdsr_geometry;

typedef struct takdsr_event { /* the outcome of one submit */
    uint32_t session, slot;
    uint64_t frame, req;
    int status;        /* TAKDSR_OK: output slot `slot` holds the frame; TAKDSR_E_SERVER: see error */
    takdsr_timings timings;
    takdsr_error error; /* status != TAKDSR_OK: e.g. BUSY (the slot is free again: resubmit later), or SLOT_IN_FLIGHT
                           (the slot's earlier frame still runs: wait for its outcome before using the slot) */
} takdsr_event;

typedef struct takdsr_client takdsr_client;
typedef struct takdsr_session takdsr_session;

/* A client for `endpoint` (NULL: $TAKDSR_UPSCALER_ENDPOINT, else ipc://$XDG_RUNTIME_DIR/takdsr/upscaler.sock, else
 * ipc:///tmp/takdsr-<uid>/upscaler.sock). `timeout_ms`: the longest wait for a reply. NULL only when out of memory
 * or when libzmq fails (a message goes to stderr). Connecting is asynchronous: takdsr_hello says at once when no daemon
 * listens on an ipc:// endpoint (TAKDSR_E_UNAVAILABLE); on tcp:// a missing daemon shows as a timeout. */
takdsr_client *takdsr_client_new(const char *endpoint, int timeout_ms);
/* Unmaps and frees every session still open (without telling the daemon: their leases expire), closes the socket. */
void takdsr_client_free(takdsr_client *c);
const takdsr_error *takdsr_last_error(const takdsr_client *c);
const char *takdsr_status_name(int status);

/* Asks for the daemon's welcome (its model, scale and limits) into *info. `client_name`, for the daemon's log: UTF-8
 * of at most 64 characters, else TAKDSR_E_ARGUMENT. */
int takdsr_hello(takdsr_client *c, const char *client_name, takdsr_info *info);
/* Pings `n` session ids (renewing their leases); alive[i] (optional) says whether sessions[i] is open. */
int takdsr_ping(takdsr_client *c, const uint32_t *sessions, size_t n, bool *alive);
/* What the daemon has done since it started and how long its latest frames took (docs/protocol.md, stats). A daemon
 * older than the request answers UNKNOWN_TYPE: TAKDSR_E_SERVER. */
int takdsr_stats(takdsr_client *c, takdsr_statistics *stats);

/* Opens a session for width x height LR frames in `format` (RGB8, BGR8, RGBA8, BGRA8) with `slots` slots (at most
 * TAKDSR_MAX_SLOTS) and maps its rings. An opened reply with another size, format or number of slots than asked for,
 * an output that is not the input times one whole scale, or segments that do not match is TAKDSR_E_PROTOCOL: the
 * geometry can be trusted to be what was asked for, times the scale. */
int takdsr_session_open(takdsr_client *c, uint32_t width, uint32_t height, const char *format, uint32_t slots,
                        takdsr_session **out);
/* Sends close, waits for closed, unmaps the rings and frees `s` (also when the daemon already forgot it). Outcomes
 * of its frames that takdsr_wait() has not returned yet are dropped (as with takdsr_session_drop): a later wait never
 * returns an event of a session that is gone. */
int takdsr_session_close(takdsr_session *s);
/* Unmaps the rings and frees `s` without a word to the daemon: for a daemon that is gone or stopping (after
 * TAKDSR_E_TIMEOUT or a SHUTTING_DOWN error), where takdsr_session_close would wait a whole timeout in vain. A daemon
 * that is still there closes the session when its lease expires. */
void takdsr_session_drop(takdsr_session *s);
uint32_t takdsr_session_id(const takdsr_session *s);
const takdsr_geometry *takdsr_session_geometry(const takdsr_session *s);
/* Input slot `slot` (height rows of in_row_stride bytes, top row first); write it only while the slot is not in
 * flight. NULL for a slot out of range. */
uint8_t *takdsr_session_input(takdsr_session *s, uint32_t slot);
/* Output slot `slot`: valid after its done event until the slot is submitted again. */
const uint8_t *takdsr_session_output(const takdsr_session *s, uint32_t slot);

/* Submits input slot `slot` as frame `frame` without waiting; the outcome comes from takdsr_wait(). */
int takdsr_submit(takdsr_session *s, uint32_t slot, uint64_t frame);
/* Waits up to `timeout_ms` (-1: the client's timeout) for the outcome of any submitted frame, in the order the daemon
 * finishes them. Returns TAKDSR_OK with `ev` filled (ev->status says done or refused), or an error status. */
int takdsr_wait(takdsr_client *c, int timeout_ms, takdsr_event *ev);
/* Frames submitted whose outcome takdsr_wait() has not returned yet. */
size_t takdsr_pending(const takdsr_client *c);

#ifdef __cplusplus
}
#endif
#endif
