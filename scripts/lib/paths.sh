# Sourced by the scripts of scripts/ that cd into the checkout, before their cd: from_here PATH prints PATH made
# absolute from the folder the script was started in, so that `cd /data && bash <checkout>/scripts/x.sh runs` writes
# to /data/runs, not <checkout>/runs. An empty PATH stays empty (the script's default then applies: the checkout's).
# command_from_here does the same for a command (PYTHON): only a name with a slash is a path; python3 is looked up.
STARTED_IN=$PWD
from_here() { if [[ -z $1 || $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$STARTED_IN" "$1"; fi; }
command_from_here() { if [[ $1 == */* ]]; then from_here "$1"; else printf '%s' "$1"; fi; }
