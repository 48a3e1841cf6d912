/* tests/test_c_client.py: a send that waits for room keeps the client's timeout while signals interrupt it.
 * Usage: signals_during_send ENDPOINT (where no daemon listens). With a 5 ms timeout, 1000 pings fill the socket's
 * queue (each times out waiting for its pong); the next ping's send then blocks, under a 0.5 ms interval timer whose
 * handler is installed without SA_RESTART. Prints "send: STATUS after N ms"; exit 0 when that is a timeout. */
#define _POSIX_C_SOURCE 200809L
#include "takdsr_client.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static void on_tick(int sig) { (void)sig; }

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    takdsr_client *c = takdsr_client_new(argv[1], 5);
    if (!c) return 1;
    uint32_t none = 0;
    bool alive = false;
    for (int i = 0; i < 1000; i++) takdsr_ping(c, &none, 0, &alive); /* each one queued, none answered */
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_tick; /* no SA_RESTART */
    sigaction(SIGALRM, &action, NULL);
    struct itimerval timer = {{0, 500}, {0, 500}};
    setitimer(ITIMER_REAL, &timer, NULL);
    long start = now_ms();
    int rc = takdsr_ping(c, &none, 0, &alive);
    long waited = now_ms() - start;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("send: %s after %ld ms: %s\n", takdsr_status_name(rc), waited, takdsr_last_error(c)->message);
    takdsr_client_free(c);
    return rc == TAKDSR_E_TIMEOUT ? 0 : 1;
}
