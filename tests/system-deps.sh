#!/usr/bin/env bash
# Install the programs the test suite drives, when they are missing (run by `make test`).
#
#   apt (Debian):  swaks, libnet-ssleay-perl  (swaks --tls, as in the dev set-up's hints)
#                  libmail-dkim-perl          (Perl Mail::DKIM: independent DKIM verifier)
#                  prometheus                 (promtool: docs/alerts.yml checks and rule unit tests;
#                                              the server: tests/test_prometheus_e2e.py)
#                  nodejs [+ npm]             (only when `node` is missing altogether)
#                  postgresql                 (a throwaway cluster for the shared-store tests;
#                                              tests/support/pg.py installs it too when missing)
#                  haproxy                    (`haproxy -c` on the scale-out example config)
#   npm:           tests/support/mailauth     (`npm ci` from its package-lock.json, only when
#                                              node_modules is missing; needs Node >= 20.18.1)
#
# Idempotent and silent when everything is present. `apt-get update` runs only when something
# has to be installed. Without root or apt-get it prints a warning and goes on: the tests that
# need a missing tool skip with the reason (or fail under MAILRELAYD_REQUIRE_VERIFIERS=1).
# Never fails the build itself: it always exits 0.
# postfix (smtp-sink / smtp-source) is only used by the benchmarks and is not installed here.
set -u

cd "$(dirname "$0")/.." || exit 0
MAILAUTH_DIR=tests/support/mailauth
NODE_MIN=20.18.1

warn() { echo "system-deps: warning: $*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
perl_has() { have perl && perl "${@/#/-M}" -e 1 >/dev/null 2>&1; }

# version_ge A B: true when dotted version A >= B.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
node_ok() { have node && version_ge "$(node --version 2>/dev/null | sed 's/^v//')" "$NODE_MIN"; }

# --- what is missing ------------------------------------------------------------------------
missing=()
have swaks || missing+=(swaks)
perl_has Net::SSLeay || missing+=(libnet-ssleay-perl)
perl_has Mail::DKIM::Verifier Net::DNS::Resolver JSON::PP || missing+=(libmail-dkim-perl)
have promtool && have prometheus || missing+=(prometheus)
have node || missing+=(nodejs)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
have haproxy || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)

apt_install() {  # apt_install PKG...: quiet, no recommends; apt's output is shown only on failure
    local out
    if ! out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Use-Pty=0 "$@" 2>&1); then
        printf '%s\n' "$out" | tail -n 20 >&2
        return 1
    fi
}

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        warn "not root, not installing: ${missing[*]} (apt-get install -y ${missing[*]}); tests needing them will skip"
    elif ! have apt-get; then
        warn "apt-get not found, not installing: ${missing[*]}; tests needing them will skip"
    else
        echo "system-deps: installing ${missing[*]}"
        # Debian's prometheus, postgresql and haproxy packages would start servers from their postinst; a policy-rc.d
        # that answers 101 ("action forbidden") stops that, if none is there already.
        policy=/usr/sbin/policy-rc.d
        made_policy=
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
        fi
        if ! out=$(apt-get update -qq 2>&1); then
            printf '%s\n' "$out" | tail -n 20 >&2
            warn "apt-get update failed"
        fi
        if ! apt_install "${missing[@]}"; then
            warn "apt-get install ${missing[*]} failed; trying one package at a time"
            for pkg in "${missing[@]}"; do
                apt_install "$pkg" || warn "could not install $pkg"
            done
        fi
        # Debian's nodejs comes without npm (NodeSource's bundles it).
        if have node && ! have npm; then
            apt_install npm || warn "could not install npm"
        fi
        [ -n "$made_policy" ] && rm -f "$policy"
    fi
fi

# --- mailauth (Node) ------------------------------------------------------------------------
if [ ! -f "$MAILAUTH_DIR/node_modules/mailauth/package.json" ]; then
    if ! have node; then
        warn "node not found: mailauth DKIM checks will skip"
    elif ! node_ok; then
        warn "node $(node --version) is older than $NODE_MIN (mailauth's minimum): mailauth DKIM checks will skip"
    elif ! have npm; then
        warn "npm not found: mailauth DKIM checks will skip"
    else
        echo "system-deps: npm ci in $MAILAUTH_DIR"
        if ! (cd "$MAILAUTH_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
            warn "npm ci in $MAILAUTH_DIR failed: mailauth DKIM checks will skip"
        fi
    fi
fi

# --- report what is still missing -----------------------------------------------------------
have promtool || warn "promtool still missing: the promtool tests in tests/test_ops_docs.py will skip"
perl_has Mail::DKIM::Verifier Net::DNS::Resolver JSON::PP \
    || warn "Perl Mail::DKIM still missing: its DKIM checks will skip"
have swaks || warn "swaks still missing (only used by hand and by the dev set-up's hints)"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    || warn "PostgreSQL still missing: the shared suppression store tests will skip"
have haproxy || [ -x /usr/sbin/haproxy ] || warn "haproxy still missing: the scale-out config check will skip"
exit 0
