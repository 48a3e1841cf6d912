/* takdsr_upscale: upscale one frame (a .ppm/.png file or a generated pattern) through the daemon's shared memory.
 *
 *   takdsr_upscale [-e ENDPOINT] (-i IN.png|IN.ppm | -p WxH) [-f FORMAT] [-s SLOTS] [-n FRAMES] [-t MS] [-S] -o OUT
 *   takdsr_upscale -h
 *
 * The frame is submitted FRAMES times, pipelined over SLOTS slots (BUSY replies are retried), and the last result is
 * written to OUT (.png or .ppm). -S then prints the daemon's statistics. Exit status: 0 on success, 1 on any error
 * (printed with the daemon's code and message), 2 for bad arguments, 128 + the signal after SIGINT or SIGTERM (the
 * session closed, nothing written). */
#define _DEFAULT_SOURCE /* nanosleep, sigaction */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "image_io.h"
#include "takdsr_client.h"

typedef struct options {
    const char *endpoint, *input, *output, *format;
    uint32_t pattern_w, pattern_h, slots, frames;
    int timeout_ms;
    bool stats; /* -S: print the daemon's statistics after the run */
} options;

/* The signal (SIGINT, SIGTERM) that asked the run to stop, 0 before. Only set in the handler: the run stops after the
 * frames in flight and closes its session, where a killed tool would leave it open until the daemon's lease ends. */
static volatile sig_atomic_t stop_signal = 0;

static void on_stop_signal(int sig) { stop_signal = sig; }

/* No SA_RESTART is needed: the client's waits go on after a signal. SA_RESETHAND: a second Ctrl-C kills at once. */
static void catch_stop_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static void usage(FILE *to, const char *argv0) {
    fprintf(to,
            "usage: %s [-e ENDPOINT] (-i IN.png|IN.ppm | -p WxH) [-f RGB8|BGR8|RGBA8|BGRA8] [-s SLOTS] [-n FRAMES]\n"
            "          [-t TIMEOUT_MS] [-S] -o OUT.png|OUT.ppm\n",
            argv0);
}

static void help(const char *argv0) {
    usage(stdout, argv0);
    printf("\nUpscale one frame through the TAKDSR daemon's shared memory (examples/c_client/README.md).\n"
           "  -e, --endpoint ENDPOINT  the daemon's ipc:// or tcp:// endpoint (default: $TAKDSR_UPSCALER_ENDPOINT, else\n"
           "                           the per-user socket the daemon binds by default)\n"
           "  -i, --input FILE         a .png (8 or 16 bit, grey, RGB or RGBA) or .ppm frame\n"
           "  -p, --pattern WxH        a generated test pattern instead of an input (1..65535 a side)\n"
           "  -f, --format FORMAT      the pixel format of the session (default RGB8)\n"
           "  -s, --slots SLOTS        frames in flight, 1..%d (default 2)\n"
           "  -n, --frames FRAMES      times the frame is upscaled, pipelined over the slots (default 1)\n"
           "  -t, --timeout MS         the longest wait for a reply, 1..3600000 (default 10000)\n"
           "  -S, --stats              print the daemon's statistics after the run\n"
           "  -o, --output FILE        where the last result is written (.png or .ppm)\n"
           "  -h, --help               this help\n"
           "Exit status: 0 done, 1 an error (with the daemon's code and message), 2 bad arguments, 128 + the signal\n"
           "after SIGINT or SIGTERM (the session closed, nothing written).\n",
           TAKDSR_MAX_SLOTS);
}

/* Says what is wrong with an argument; -1, parse()'s "bad arguments". */
__attribute__((format(printf, 1, 2))) static int bad(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

/* Decimal digits only (no sign, no blanks), min <= value <= max; the end of the number goes to *end. */
static bool parse_uint(const char *text, unsigned long min, unsigned long max, uint32_t *out, const char **end) {
    if (!isdigit((unsigned char)text[0])) return false; /* strtoul would take "-5" as a huge number */
    char *stop;
    unsigned long value = strtoul(text, &stop, 10);
    if (value < min || value > max) return false;
    *out = (uint32_t)value;
    *end = stop;
    return true;
}

/* A whole argument that is a number in [min, max]. */
static bool parse_arg(const char *text, unsigned long min, unsigned long max, uint32_t *out) {
    const char *end;
    return parse_uint(text, min, max, out, &end) && *end == '\0';
}

/* "WxH", each side 1 to 65535 (the protocol's limit). */
static bool parse_size(const char *text, uint32_t *w, uint32_t *h) {
    const char *end;
    return parse_uint(text, 1, 65535, w, &end) && *end == 'x' && parse_arg(end + 1, 1, 65535, h);
}

/* A file the tool cannot read or write is a bad argument, refused before any work (not after every frame has run). */
static bool name_ok(const char *option, const char *path) {
    if (!path || image_name_ok(path)) return true;
    fprintf(stderr, "error: %s %s: the name must end in .png or .ppm (any case)\n", option, path);
    return false;
}

/* The output's folder must exist and be writable, and the output must not be a folder itself. */
static bool output_ok(const char *path) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        fprintf(stderr, "error: -o %s is a folder; name the file to write\n", path);
        return false;
    }
    char folder[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(folder, sizeof folder, ".");
    else snprintf(folder, sizeof folder, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    if (access(folder, W_OK | X_OK) != 0) {
        fprintf(stderr, "error: -o %s: cannot write into %s: %s\n", path, folder, strerror(errno));
        return false;
    }
    return true;
}

/* One of the four formats of section 6.3, as the daemon spells them. */
static bool format_ok(const char *format) {
    static const char *const formats[] = {"RGB8", "BGR8", "RGBA8", "BGRA8"};
    for (size_t i = 0; i < sizeof formats / sizeof *formats; i++)
        if (strcmp(format, formats[i]) == 0) return true;
    fprintf(stderr, "error: -f %s: use RGB8, BGR8, RGBA8 or BGRA8\n", format);
    return false;
}

/* ipc://PATH or tcp://HOST:PORT with a port of 1..65535, the forms the daemon binds: anything else could never
   connect (libzmq would take port 99999 modulo 65536, as 34463; the daemon refuses abstract sockets, ipc://@name). */
static bool endpoint_ok(const char *endpoint) {
    if (!endpoint) return true; /* the default */
    const char *port = strrchr(endpoint, ':');
    bool ipc = strncmp(endpoint, "ipc://", 6) == 0 && endpoint[6] != '\0' && endpoint[6] != '@';
    bool tcp = strncmp(endpoint, "tcp://", 6) == 0 && port > endpoint + 6 && isdigit((unsigned char)port[1]) &&
               strspn(port + 1, "0123456789") == strlen(port + 1) && strlen(port + 1) <= 5 &&
               atol(port + 1) >= 1 && atol(port + 1) <= 65535;
    if (ipc || tcp) return true;
    fprintf(stderr, "error: -e %s: use ipc:///path/to/socket (a file: the daemon serves no abstract ipc://@name) or "
                    "tcp://HOST:PORT (PORT 1..65535)\n", endpoint);
    return false;
}

/* 0: run; 1: help was asked for (printed); -1: bad arguments (said why, or getopt did). */
static int parse(int argc, char **argv, options *o) {
    *o = (options){.format = "RGB8", .slots = 2, .frames = 1, .timeout_ms = 10000};
    static const struct option longs[] = {
        {"endpoint", required_argument, NULL, 'e'}, {"input", required_argument, NULL, 'i'},
        {"pattern", required_argument, NULL, 'p'},  {"format", required_argument, NULL, 'f'},
        {"slots", required_argument, NULL, 's'},    {"frames", required_argument, NULL, 'n'},
        {"timeout", required_argument, NULL, 't'},  {"output", required_argument, NULL, 'o'},
        {"stats", no_argument, NULL, 'S'},          {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "e:i:p:f:s:n:t:o:Sh", longs, NULL)) != -1) {
        switch (opt) {
        case 'e': o->endpoint = optarg; break;
        case 'i': o->input = optarg; break;
        case 'p':
            if (!parse_size(optarg, &o->pattern_w, &o->pattern_h))
                return bad("-p %s: give WIDTHxHEIGHT, each 1..65535 (e.g. 320x180)", optarg);
            break;
        case 'f': o->format = optarg; break;
        case 's':
            if (!parse_arg(optarg, 1, TAKDSR_MAX_SLOTS, &o->slots))
                return bad("-s %s: SLOTS must be a whole number from 1 to %d", optarg, TAKDSR_MAX_SLOTS);
            break;
        case 'n':
            if (!parse_arg(optarg, 1, UINT32_MAX, &o->frames))
                return bad("-n %s: FRAMES must be a whole number from 1 to 4294967295", optarg);
            break;
        case 't': {
            uint32_t ms;
            if (!parse_arg(optarg, 1, 3600000, &ms))
                return bad("-t %s: TIMEOUT_MS must be a whole number of milliseconds from 1 to 3600000", optarg);
            o->timeout_ms = (int)ms;
            break;
        }
        case 'o': o->output = optarg; break;
        case 'S': o->stats = true; break;
        case 'h': help(argv[0]); return 1;
        default: return -1; /* getopt has said which option */
        }
    }
    if (optind != argc) return bad("%s: an argument this tool does not take (options only)", argv[optind]);
    if ((o->input != NULL) == (o->pattern_w > 0)) return bad("%s", "give one frame: -i FILE or -p WxH");
    if (!o->output) return bad("%s", "-o OUT.png|OUT.ppm is required: where to write the result");
    bool ok = name_ok("-i", o->input) && name_ok("-o", o->output) && output_ok(o->output) && format_ok(o->format) &&
              endpoint_ok(o->endpoint);
    return ok ? 0 : -1;
}

/* Byte index of R, G, B in a pixel of `format`, and whether it has alpha (section 6.3 of docs/protocol.md). */
static void layout(const char *format, int rgb[3], bool *alpha) {
    bool bgr = format[0] == 'B';
    rgb[0] = bgr ? 2 : 0, rgb[1] = 1, rgb[2] = bgr ? 0 : 2;
    *alpha = strchr(format, 'A') != NULL;
}

/* RGB(A) image -> a slot in `format` (alpha 255 when the image has none). */
static void to_slot(const image *img, const takdsr_geometry *g, uint8_t *slot) {
    int rgb[3];
    bool alpha;
    layout(g->format, rgb, &alpha);
    for (size_t i = 0; i < (size_t)img->width * img->height; i++) {
        const uint8_t *src = img->pixels + i * img->channels;
        uint8_t *dst = slot + i * g->channels;
        for (int c = 0; c < 3; c++) dst[rgb[c]] = src[c];
        if (alpha) dst[3] = img->channels == 4 ? src[3] : 255;
    }
}

/* An output slot in `format` -> RGB or RGBA image. */
static void from_slot(const uint8_t *slot, const takdsr_geometry *g, image *img) {
    int rgb[3];
    bool alpha;
    layout(g->format, rgb, &alpha);
    for (size_t i = 0; i < (size_t)img->width * img->height; i++) {
        const uint8_t *src = slot + i * g->channels;
        uint8_t *dst = img->pixels + i * img->channels;
        for (int c = 0; c < 3; c++) dst[c] = src[rgb[c]];
        if (img->channels == 4) dst[3] = src[3];
    }
}

static int print_error(const takdsr_error *e, const char *what) {
    if (e->status == TAKDSR_E_SERVER)
        fprintf(stderr, "error: %s: daemon error %d %s: %s\n", what, e->code, e->name, e->message);
    else
        fprintf(stderr, "error: %s: %s: %s\n", what, takdsr_status_name(e->status), e->message);
    return 1;
}

static int report(takdsr_client *c, const char *what) { return print_error(takdsr_last_error(c), what); }

/* The daemon's statistics, after the run (so the session of this run is closed and its frames are counted). */
static int print_statistics(takdsr_client *c) {
    takdsr_statistics st;
    if (takdsr_stats(c, &st) != TAKDSR_OK) return report(c, "asking the daemon's statistics");
    printf("daemon statistics: %llu frame(s) done, %llu failed, %llu refused BUSY in %.1f s; %u session(s) open, "
           "%u frame(s) queued; the latest %u frame(s): total p50 %.2f ms p99 %.2f ms, model p50 %.2f ms p99 %.2f ms\n",
           (unsigned long long)st.frames_done, (unsigned long long)st.frames_failed,
           (unsigned long long)st.frames_busy, (double)st.uptime_ms / 1000.0, st.sessions, st.queued,
           st.recent_frames, (double)st.total_us_p50 / 1000.0, (double)st.total_us_p99 / 1000.0,
           (double)st.infer_us_p50 / 1000.0, (double)st.infer_us_p99 / 1000.0);
    return 0;
}

/* A run of frames over one session. */
typedef struct run {
    takdsr_client *c;
    takdsr_session *s;
    bool busy[TAKDSR_MAX_SLOTS]; /* slots in flight */
    int last_slot;               /* the slot holding the last frame's result once it is done, else -1 */
    uint64_t total_us;           /* the daemon's time for the frames done */
    bool daemon_gone;            /* the run ended on an error that says the daemon is stopping or does not answer */
} run;

/* Prints `e` and notes whether the daemon is gone: closing the session would then wait a whole timeout in vain. A
 * run asked to stop (a stalled daemon's wait ended by its timeout, say) still ends with 128 + the signal. */
static int run_error(run *r, const takdsr_error *e, const char *what) {
    r->daemon_gone = e->status == TAKDSR_E_TIMEOUT || e->status == TAKDSR_E_UNAVAILABLE ||
                     (e->status == TAKDSR_E_SERVER && e->code == TAKDSR_SHUTTING_DOWN);
    print_error(e, what);
    return stop_signal ? 128 + stop_signal : 1;
}

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* Waits for one finished frame (a BUSY frame is resubmitted after a growing pause) and frees its slot; notes the slot
 * of frame `last` when it is done. */
static int collect(run *r, uint64_t last) {
    long pause = 1;
    for (;;) {
        takdsr_event ev;
        if (takdsr_wait(r->c, -1, &ev) != TAKDSR_OK)
            return run_error(r, takdsr_last_error(r->c), "waiting for a frame");
        if (ev.status == TAKDSR_OK) {
            r->total_us += ev.timings.total_us;
            if (ev.frame == last) r->last_slot = (int)ev.slot;
            r->busy[ev.slot] = false;
            return 0;
        }
        if (ev.error.code != TAKDSR_BUSY || pause > 1000) {
            char what[32];
            snprintf(what, sizeof what, "frame %llu", (unsigned long long)ev.frame);
            return run_error(r, &ev.error, what);
        }
        pause_ms(pause);
        pause = pause < 50 ? pause * 2 : pause + 50;
        if (takdsr_submit(r->s, ev.slot, ev.frame) != TAKDSR_OK)
            return run_error(r, takdsr_last_error(r->c), "resubmitting a busy frame");
    }
}

/* Submits the frame o->frames times over the session's slots and copies the last result into out. After SIGINT or
 * SIGTERM it submits no more and returns 128 + the signal once the frames in flight are back. */
static int run_frames(run *r, const options *o, const image *lr, image *out) {
    const takdsr_geometry *g = takdsr_session_geometry(r->s);
    int status;
    for (uint64_t f = 1; f <= o->frames && !stop_signal; f++) { /* 64 bits: f++ past UINT32_MAX must not wrap */
        while (takdsr_pending(r->c) >= g->slots)
            if ((status = collect(r, o->frames)) != 0) return status; /* 1, or 128 + a signal that came meanwhile */
        uint32_t slot = 0;
        while (r->busy[slot]) slot++;
        to_slot(lr, g, takdsr_session_input(r->s, slot));
        if (takdsr_submit(r->s, slot, f) != TAKDSR_OK)
            return run_error(r, takdsr_last_error(r->c), "submitting a frame");
        r->busy[slot] = true;
    }
    while (takdsr_pending(r->c) > 0)
        if ((status = collect(r, o->frames)) != 0) return status;
    if (stop_signal) {
        fprintf(stderr, "interrupted by signal %d: closing the session, nothing written\n", (int)stop_signal);
        return 128 + stop_signal;
    }
    from_slot(takdsr_session_output(r->s, (uint32_t)r->last_slot), g, out);
    printf("%u frame(s) %ux%u -> %ux%u %s, mean daemon time %.2f ms\n", o->frames, g->width, g->height,
           g->out_width, g->out_height, g->format, (double)r->total_us / 1000.0 / o->frames);
    return 0;
}

/* Upscales the input (its header says `width` x `height`) or with -p a pattern, decoded or made only once the
 * daemon has accepted their size: a huge -p, or a small PNG declaring a huge size, would otherwise fill memory
 * before the daemon could refuse it. */
static int upscale(takdsr_client *c, const options *o, uint32_t width, uint32_t height, image *lr, image *out) {
    takdsr_info info;
    if (takdsr_hello(c, "takdsr_upscale (C)", &info) != TAKDSR_OK) return report(c, "hello");
    printf("daemon %s: model %s x%u on %s (%s)%s\n", info.server, info.model, info.scale, info.device, info.precision,
           info.random_weights ? " [RANDOM WEIGHTS: output is noise]" : "");
    takdsr_session *s;
    if (takdsr_session_open(c, width, height, o->format, o->slots, &s) != TAKDSR_OK)
        return report(c, "opening a session");
    /* from here a signal stops the run and closes the session; before, there is nothing to close, and Ctrl-C ends the
     * tool at once (not after a wait for an absent daemon) */
    catch_stop_signals();
    const takdsr_geometry *g = takdsr_session_geometry(s);
    run r = {.c = c, .s = s, .last_slot = -1};
    int rc = 1;
    if (o->input && (image_load(o->input, lr) != 0 || lr->width != width || lr->height != height)) {
        if (lr->pixels) fprintf(stderr, "error: %s changed while it was read\n", o->input); /* else image_load said */
    } else if (!o->input && image_pattern(width, height, g->channels, lr) != 0) /* takdsr_session_open's size */
        fprintf(stderr, "error: out of memory for a %ux%u pattern\n", width, height);
    else if (image_pattern(g->out_width, g->out_height, g->channels, out) != 0)
        fprintf(stderr, "error: out of memory for a %ux%u result\n", g->out_width, g->out_height);
    else
        rc = run_frames(&r, o, lr, out);
    if (r.daemon_gone)
        takdsr_session_drop(s);
    else if (takdsr_session_close(s) != TAKDSR_OK && rc == 0)
        rc = report(c, "closing the session");
    return rc == 0 && o->stats ? print_statistics(c) : rc;
}

int main(int argc, char **argv) {
    options o;
    int parsed = parse(argc, argv, &o);
    if (parsed > 0) return 0; /* --help */
    if (parsed < 0) {
        usage(stderr, argv[0]);
        return 2;
    }
    image lr = {0}, hr = {0};
    uint32_t width = o.pattern_w, height = o.pattern_h;
    if (o.input && image_size(o.input, &width, &height) != 0) return 1; /* an unreadable input: before connecting */
    takdsr_client *c = takdsr_client_new(o.endpoint, o.timeout_ms);
    int rc = c ? upscale(c, &o, width, height, &lr, &hr) : 1;
    if (rc == 0) rc = image_save(o.output, &hr) == 0 ? 0 : 1;
    takdsr_client_free(c);
    image_free(&lr);
    image_free(&hr);
    return rc;
}
