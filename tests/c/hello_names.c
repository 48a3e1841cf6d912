/* tests/test_c_client.py: takdsr_hello refuses a client name the daemon would refuse (not UTF-8, or longer than 64
 * characters) with TAKDSR_E_ARGUMENT before sending anything, and the daemon accepts 64 characters of two bytes each.
 * Usage: hello_names ENDPOINT. Prints one line per name; exit 0 when every name got the status expected. */
#define _POSIX_C_SOURCE 200809L
#include "takdsr_client.h"

#include <stdio.h>
#include <string.h>

static int check(takdsr_client *c, const char *label, const char *name, int expected) {
    takdsr_info info;
    int rc = takdsr_hello(c, name, &info);
    printf("%s: %s%s%s\n", label, takdsr_status_name(rc), rc ? ": " : "", rc ? takdsr_last_error(c)->message : "");
    return rc == expected ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    takdsr_client *c = takdsr_client_new(argv[1], 5000);
    if (!c) return 1;
    char long_ascii[66], wide[129];
    memset(long_ascii, 'a', 65), long_ascii[65] = '\0';
    for (int i = 0; i < 64; i++) memcpy(wide + 2 * i, "\xc3\xa9", 2); /* 64 x U+00E9: 128 bytes, 64 characters */
    wide[128] = '\0';
    int failures = check(c, "invalid byte", "bad\xff", TAKDSR_E_ARGUMENT) +
                   check(c, "overlong slash", "\xc0\xaf", TAKDSR_E_ARGUMENT) +
                   check(c, "surrogate", "\xed\xa0\x80", TAKDSR_E_ARGUMENT) +
                   check(c, "cut short", "abc\xe2\x82", TAKDSR_E_ARGUMENT) +
                   check(c, "65 characters", long_ascii, TAKDSR_E_ARGUMENT) +
                   check(c, "NULL", NULL, TAKDSR_E_ARGUMENT) +
                   check(c, "64 two-byte characters", wide, TAKDSR_OK) +
                   check(c, "four-byte character", "engine \xf0\x9f\x8e\xae", TAKDSR_OK);
    takdsr_client_free(c);
    return failures ? 1 : 0;
}
