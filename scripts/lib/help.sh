# Sourced first by every script in scripts/: with -h or --help as the first argument it prints the calling
# script's header comment (line 2 up to the first line that is blank or not a comment: what it does and its
# usage), then what the script's more_help function adds, if it defines one, and exits 0 before anything runs.
# It also defines usage_text, which prints that header, for the script's own usage errors.
#   source "$(dirname "$0")/lib/help.sh" "$@"
usage_text() { sed -n '2,/^[^#]\|^$/{/^#/s/^# \{0,1\}//p}' "$0"; }  # a blank line ends it too
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage_text
    if declare -F more_help >/dev/null; then more_help; fi
    exit 0
fi
