/* tests/test_c_client.py: a session the daemon opens for a takdsr_session_open that timed out is closed when its late
 * `opened` arrives. Usage: late_opened ENDPOINT DAEMON_PID. Stops the daemon (SIGSTOP) for the open, lets it go on,
 * then pings (which reads the late reply) and prints the daemon's count of open sessions: 0 when it was closed. */
#define _POSIX_C_SOURCE 200809L
#include "takdsr_client.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    pid_t daemon = (pid_t)atol(argv[2]);
    takdsr_client *c = takdsr_client_new(argv[1], 1000);
    takdsr_info info;
    takdsr_session *s;
    takdsr_statistics stats;
    if (!c || takdsr_hello(c, "late_opened", &info) != TAKDSR_OK) return 1;
    kill(daemon, SIGSTOP);
    int rc = takdsr_session_open(c, 64, 64, "RGBA8", 2, &s);
    kill(daemon, SIGCONT);
    printf("open: %s\n", takdsr_status_name(rc));
    pause_ms(500); /* the daemon opens the session and sends the late `opened` */
    if (takdsr_ping(c, NULL, 0, NULL) != TAKDSR_OK) return 1; /* reads it: the client closes that session */
    pause_ms(300);
    if (takdsr_stats(c, &stats) != TAKDSR_OK) return 1;
    printf("sessions open: %u\n", stats.sessions);
    takdsr_client_free(c);
    return rc == TAKDSR_E_TIMEOUT && stats.sessions == 0 ? 0 : 1;
}
