/* tests/test_c_client.py: the C client's waits survive signals. Many engines run an interval timer (frame pacing,
 * a profiler) whose handler is installed without SA_RESTART, so every blocking call it lands in fails with EINTR.
 * Usage: signals_during_wait ENDPOINT FRAMES. Prints one line per failed call; exit 0 when none failed. */
#define _POSIX_C_SOURCE 200809L
#include "takdsr_client.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

static volatile sig_atomic_t ticks;

static void on_tick(int sig) {
    (void)sig;
    ticks++;
}

static void set_timer(long interval_us) {
    struct itimerval timer = {{0, interval_us}, {0, interval_us}};
    setitimer(ITIMER_REAL, &timer, NULL);
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int frames = atoi(argv[2]);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_tick; /* no SA_RESTART */
    sigaction(SIGALRM, &action, NULL);

    takdsr_client *c = takdsr_client_new(argv[1], 30000);
    takdsr_info info;
    takdsr_session *s = NULL;
    if (!c || takdsr_hello(c, "signals-test", &info) || takdsr_session_open(c, 64, 48, "RGB8", 1, &s)) {
        printf("setup: %s\n", c ? takdsr_last_error(c)->message : "no client");
        return 1;
    }
    int failed = 0;
    takdsr_event ev;
    if (takdsr_submit(s, 0, 1000) == TAKDSR_OK && takdsr_wait(c, 0, &ev) == TAKDSR_E_TIMEOUT) /* a poll: no frame yet */
        printf("poll: %s\n", takdsr_last_error(c)->message);
    if (takdsr_wait(c, -1, &ev) != TAKDSR_OK) { /* that frame, if the poll did not get it */
        printf("first frame: %s\n", takdsr_last_error(c)->message);
        return 1;
    }
    set_timer(500); /* a signal every 0.5 ms: every wait for a frame is interrupted several times */
    for (int i = 0; i < frames; i++) {
        int rc = takdsr_submit(s, 0, (uint64_t)i);
        if (rc == TAKDSR_OK) rc = takdsr_wait(c, -1, &ev);
        if (rc != TAKDSR_OK || ev.status != TAKDSR_OK) {
            printf("frame %d: %s: %s\n", i, takdsr_status_name(rc), takdsr_last_error(c)->message);
            failed++;
            break;
        }
    }
    set_timer(0);
    printf("signals: %d\n", (int)ticks);
    takdsr_session_close(s);
    takdsr_client_free(c);
    return failed ? 1 : 0;
}
