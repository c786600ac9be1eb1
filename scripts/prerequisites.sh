#!/usr/bin/env bash
# What `make run` and `make test` need, checked before anything else: the Rust version of
# Cargo.toml's rust-version, PostgreSQL and RabbitMQ installed and running (started here
# when root can start them), and the logins of SMSGW_DATABASE_URL and SMSGW_AMQP_URL (the
# local postgres and guest by default). Each missing piece is named with what to install,
# start or change; nothing here changes the machine but starting the local services.
# Fast when all is well: no compiler, no Erlang VM, one psql and one AMQP handshake.
#
#   scripts/prerequisites.sh run    what `make run` needs
#   scripts/prerequisites.sh test   and what `make test` needs besides (rabbitmqctl)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
missing=0

fail() {
    missing=1
    printf 'prerequisites: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf '    %s\n' "$line" >&2; done
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Rust: rustc at least Cargo.toml's rust-version.
need=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
have=$(rustc --version 2>/dev/null | awk '{print $2}')
if ! command -v cargo >/dev/null || [ -z "$have" ]; then
    fail "Rust is not installed: smsgw needs $need or later." \
        "Install it with rustup (https://rustup.rs), as your own user. Debian's own rustc" \
        "package is older than $need."
elif [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n 1)" != "$need" ]; then
    fail "rustc $have is older than $need (rust-version in Cargo.toml)." \
        "rustup update   (or install Rust with rustup: https://rustup.rs)"
fi

# The services: installed, and running (or startable here).
database_url=${SMSGW_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/smsgw}
amqp_url=${SMSGW_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
amqp_url=${amqp_url%%,*}
local_service() { # url default-port -> host port, when the URL's host is this machine
    local rest=${1#*://}
    rest=${rest#*@}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    local host=${rest%:*} port=${rest##*:}
    [ "$port" = "$rest" ] && port=$2
    echo "$host $port"
}
read -r pg_host pg_port < <(local_service "$database_url" 5432)
read -r mq_host mq_port < <(local_service "$amqp_url" 5672)
is_local() { [ "$1" = 127.0.0.1 ] || [ "$1" = localhost ] || [ "$1" = "[::1]" ]; }

if ! command -v psql >/dev/null; then
    fail "psql is not installed (make and the tests use it)." \
        "sudo apt-get install postgresql        (the server and psql)"
fi
start_services=no
if ! port_open "$pg_host" "$pg_port"; then
    if ! is_local "$pg_host"; then
        fail "PostgreSQL does not answer at $pg_host:$pg_port (SMSGW_DATABASE_URL)."
    elif ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        fail "PostgreSQL is not installed." "sudo apt-get install postgresql"
    elif [ "$(id -u)" -ne 0 ]; then
        fail "PostgreSQL is installed but not running." "sudo systemctl start postgresql"
    else
        start_services=yes
    fi
fi
if ! port_open "$mq_host" "$mq_port"; then
    if ! is_local "$mq_host"; then
        fail "RabbitMQ does not answer at $mq_host:$mq_port (SMSGW_AMQP_URL)."
    elif ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
        fail "RabbitMQ is not installed." "sudo apt-get install rabbitmq-server"
    elif [ "$(id -u)" -ne 0 ]; then
        fail "RabbitMQ is installed but not running." "sudo systemctl start rabbitmq-server"
    else
        start_services=yes
    fi
fi
if [ "$missing" = 0 ] && [ "$start_services" = yes ]; then
    scripts/services.sh || fail "the local services did not start (scripts/services.sh)."
fi

# The PostgreSQL login, with the right to create databases (development creates smsgw's,
# each test its own).
if [ "$missing" = 0 ]; then
    admin_url="${database_url%/*}/postgres"
    if ! answer=$(PGCONNECT_TIMEOUT=3 psql "$admin_url" -XtAc \
        "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user" 2>&1); then
        fail "PostgreSQL refuses the login of SMSGW_DATABASE_URL ($(sed 's|://[^@]*@|://…@|' <<<"$database_url")):" \
            "$(head -n 1 <<<"$answer")" \
            "Debian's PostgreSQL asks for a password over TCP (scram-sha-256 in pg_hba.conf)," \
            "and its postgres user has none. Either give it one and put it in the URL:" \
            "  sudo -u postgres psql -c \"ALTER ROLE postgres PASSWORD 'dev'\"" \
            "  export SMSGW_DATABASE_URL=postgres://postgres:dev@127.0.0.1:5432/smsgw" \
            "or trust local TCP logins as postgres, on a development machine only: add" \
            "  host all postgres 127.0.0.1/32 trust" \
            "above the other host lines of /etc/postgresql/*/main/pg_hba.conf, then" \
            "  sudo systemctl reload postgresql"
    elif [ "$answer" != t ]; then
        fail "the PostgreSQL login of SMSGW_DATABASE_URL may not create databases." \
            "sudo -u postgres psql -c 'ALTER ROLE <that user> CREATEDB'"
    fi
fi

# The AMQP login: an AMQP 0-9-1 handshake up to Connection.Tune, which RabbitMQ sends only
# once it has accepted the credentials (PLAIN).
hex_escapes() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n' | sed 's/\(..\)/\\x\1/g'; }
be32() {
    printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 >> 24 & 255)) $(($1 >> 16 & 255)) \
        $(($1 >> 8 & 255)) $(($1 & 255))
}
read_frame_bytes() { timeout 3 dd bs="$1" count=1 iflag=fullblock 2>/dev/null <&3 | od -An -v -tu1; }
amqp_login() { # host port user password -> 0 accepted, 1 refused, 2 no answer
    # (A group: `exec 2>/dev/null` alone would silence the rest of the script.)
    { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null || return 2
    printf 'AMQP\x00\x00\x09\x01' >&3
    local header reply
    read -r -a header < <(read_frame_bytes 7)
    if [ "${#header[@]}" -ne 7 ] || [ "${header[0]}" -ne 1 ]; then
        exec 3>&-
        return 2
    fi
    read_frame_bytes $(((header[3] << 24) + (header[4] << 16) + (header[5] << 8) + header[6] + 1)) >/dev/null
    local response=$((2 + ${#3} + ${#4}))
    printf "\\x01\\x00\\x00$(be32 $((24 + response)))\\x00\\x0a\\x00\\x0b\\x00\\x00\\x00\\x00\\x05PLAIN$(be32 $response)\\x00$(hex_escapes "$3")\\x00$(hex_escapes "$4")\\x05en_US\\xce" >&3
    read -r -a reply < <(read_frame_bytes 11)
    exec 3>&-
    [ "${#reply[@]}" -eq 11 ] && [ "${reply[*]:7:4}" = "0 10 0 30" ]
}
url_decode() { printf '%b' "${1//%/\\x}"; }
if [ "$missing" = 0 ]; then
    credentials=${amqp_url#*://}
    credentials=${credentials%%@*}
    [ "$credentials" = "${amqp_url#*://}" ] && credentials=guest:guest
    amqp_user=$(url_decode "${credentials%%:*}")
    amqp_password=$(url_decode "${credentials#*:}")
    amqp_login "$mq_host" "$mq_port" "$amqp_user" "$amqp_password"
    answer=$?
    if [ "$answer" = 2 ]; then
        fail "RabbitMQ does not answer at $mq_host:$mq_port (SMSGW_AMQP_URL)."
    elif [ "$answer" != 0 ]; then
        fail "RabbitMQ refuses the login '$amqp_user' of SMSGW_AMQP_URL at $mq_host:$mq_port." \
            "Its guest user may log in only from this machine (loopback_users), with guest" \
            "as the password; a broker elsewhere needs a user of its own:" \
            "  sudo rabbitmqctl add_user smsgw <password>" \
            "  sudo rabbitmqctl set_permissions -p / smsgw '.*' '.*' '.*'" \
            "  export SMSGW_AMQP_URL=amqp://smsgw:<password>@<host>:5672/%2f"
    fi
fi

# The tests create a vhost each with rabbitmqctl, which Debian's wrapper runs only for
# root and the rabbitmq user.
if [ "$mode" = test ]; then
    # (Debian installs it in /usr/sbin, which is not on a user's PATH.)
    ctl=$(command -v rabbitmqctl || ls /usr/sbin/rabbitmqctl 2>/dev/null || true)
    if [ -z "$ctl" ]; then
        fail "rabbitmqctl is not installed (the tests create a vhost each with it)." \
            "sudo apt-get install rabbitmq-server"
    elif [ "$(id -u)" -ne 0 ] && [ "$(id -un)" != rabbitmq ] &&
        [ "$(basename "$(readlink -f "$ctl")")" = rabbitmq-script-wrapper ]; then
        fail "Debian's rabbitmqctl runs only as root or rabbitmq, and the tests need it." \
            "Run the tests as root (sudo make test), or use RabbitMQ's own rabbitmqctl with" \
            "the broker's cookie:" \
            "  sudo install -m 600 -o \"\$USER\" /var/lib/rabbitmq/.erlang.cookie ~/.erlang.cookie" \
            "  export PATH=/usr/lib/rabbitmq/bin:\$PATH"
    fi
fi

exit "$missing"
