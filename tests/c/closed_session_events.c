/* tests/test_c_client.py: outcomes of a closed session are never returned. Usage: closed_session_events ENDPOINT.
 * Submits two frames of a 16x16 session, lets their done replies arrive, closes it and opens another: nothing may be
 * pending, and a wait must time out rather than return an event of the session that is gone. Exit 0 when so. */
#define _POSIX_C_SOURCE 200809L
#include "takdsr_client.h"

#include <stdio.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    takdsr_client *c = takdsr_client_new(argv[1], 5000);
    takdsr_info info;
    takdsr_session *old, *new;
    if (!c || takdsr_hello(c, "closed_session_events", &info) != TAKDSR_OK) return 1;
    if (takdsr_session_open(c, 16, 16, "RGBA8", 2, &old) != TAKDSR_OK) return 1;
    if (takdsr_submit(old, 0, 100) != TAKDSR_OK || takdsr_submit(old, 1, 101) != TAKDSR_OK) return 1;
    struct timespec pause = {0, 300 * 1000000L}; /* the done replies arrive meanwhile; the close reads past them */
    nanosleep(&pause, NULL);
    uint32_t old_id = takdsr_session_id(old);
    if (takdsr_session_close(old) != TAKDSR_OK) return 1;
    printf("pending after close: %zu\n", takdsr_pending(c));
    if (takdsr_session_open(c, 32, 32, "RGBA8", 2, &new) != TAKDSR_OK) return 1;
    size_t pending = takdsr_pending(c);
    takdsr_event ev;
    int rc = pending ? takdsr_wait(c, 300, &ev) : TAKDSR_E_TIMEOUT; /* with none pending, a wait is an argument error */
    if (rc == TAKDSR_OK) printf("wait: an event of session %u (closed: %u)\n", ev.session, old_id);
    else printf("wait: %s\n", takdsr_status_name(rc));
    takdsr_session_close(new);
    takdsr_client_free(c);
    return rc == TAKDSR_OK || pending ? 1 : 0;
}
