#!/usr/bin/env bash
# Installs what the agents, the testbed and the tests need on a Debian machine, as root.
# Idempotent: a second run only checks. Steps:
#   1. Debian packages: CRIU's build deps, protoc (prost-build),
#      iproute2/util-linux (testbed), openssl (fleet certificates).
#   2. CRIU >= 4.1 with the fixes in deploy/criu-patches at /usr/local/sbin/criu, unless that already is
#      one (its `criu --version` names the patch set: "GitID: migrate-<sha256 prefix>"); a `criu` without
#      them that comes first on PATH is an error (the agents would run it).
#      Debian bookworm's 3.17 fails on recent kernels (vDSO), so CRIU is built from Debian sid's *source*
#      package: a deb-src-only apt source is added (never a binary sid source), the upstream orig tarball
#      fetched with `apt-get source --download-only`, the patches applied (one already in the source is
#      skipped), and `make criu` run in a scratch directory. The patches: 0001 keeps a lazy dump lazy
#      when a thread's stack pointer happens to be page aligned (CRIU 4.2.1 then writes all memory into
#      the images, and a migration moves it all during the freeze); 0002 adds `--lazy-pages-in-place`,
#      which leaves lazy pages in the stopped tree instead of collecting them into CRIU's page pipes
#      during the freeze (the agents read them from the tree, never from CRIU's page server).
#   3. fs.pipe-max-size raised to 4 MiB, now and at boot (/etc/sysctl.d/60-migrate-criu.conf): without
#      CAP_SYS_RESOURCE CRIU cannot grow its page pipes past the default limit and `criu dump
#      --lazy-pages` fails with "page-pipe: splice ... Bad file descriptor".
#   4. `criu check`, and a note when /run is no tmpfs: CRIU keeps its probe of the kernel's features
#      (/run/criu.kdat) only on a tmpfs and otherwise probes again on every run (on the test VM about
#      35 ms before a dump freezes anything, and about 15 ms of each restore, which is downtime).
set -euo pipefail

CRIU_MIN_MAJOR=4
CRIU_MIN_MINOR=1
CRIU_PREFIX=/usr/local/sbin
CRIU_PATCHES=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" >/dev/null && pwd)/criu-patches

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and CRIU): sudo $0"
command -v apt-get >/dev/null || die "this script needs a Debian-like system with apt-get"

PKGS=(build-essential pkgconf git ca-certificates xz-utils patch
      libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
      libnl-3-dev libnet1-dev libcap-dev libbsd-dev libnftables-dev libgnutls28-dev
      python3-protobuf uuid-dev
      iproute2 util-linux procps openssl tmux)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The patch set's name, built into CRIU as its GitID: a CRIU built from other patches (or none) is rebuilt.
patches=("$CRIU_PATCHES"/*.patch)
[ -f "${patches[0]}" ] || die "no CRIU patches in $CRIU_PATCHES (a partial checkout?)"
CRIU_GITID="migrate-$(cat "${patches[@]}" | sha256sum | cut -c1-12)"

criu_ok() {
  # A CRIU counts only when it is new enough, carries this patch set, and `criu check` passes on this
  # kernel.
  local bin=$1 v major minor
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  [ -n "$major" ] || return 1
  if [ "$major" -lt "$CRIU_MIN_MAJOR" ] || { [ "$major" -eq "$CRIU_MIN_MAJOR" ] && [ "$minor" -lt "$CRIU_MIN_MINOR" ]; }; then
    log "$bin is CRIU $v, older than $CRIU_MIN_MAJOR.$CRIU_MIN_MINOR"
    return 1
  fi
  if ! "$bin" --version 2>/dev/null | grep -qx "GitID: $CRIU_GITID"; then
    log "$bin is CRIU $v without this checkout's fixes (deploy/criu-patches, GitID $CRIU_GITID)"
    return 1
  fi
  "$bin" check >/dev/null 2>&1 || { log "$bin ($v) fails 'criu check' on this kernel"; return 1; }
}

if criu_ok "$CRIU_PREFIX/criu"; then
  log "CRIU already works: $CRIU_PREFIX/criu ($("$CRIU_PREFIX/criu" --version | sed -n 's/^Version: *//p'))"
else
  log "building CRIU >= $CRIU_MIN_MAJOR.$CRIU_MIN_MINOR from Debian sid's source package"
  src_list=/etc/apt/sources.list.d/migrate-criu-sid-src.sources
  if [ ! -f "$src_list" ]; then
    cat > "$src_list" <<'SRC'
# Added by migrate's deploy/install.sh: source packages only (deb-src), used to build CRIU >= 4.1.
# No binary packages are ever installed from sid.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq
  work=$(mktemp -d /tmp/criu-build.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  # The .debian.tar.xz may 404 on a mirror: only the upstream orig tarball is needed, so ignore failure
  # as long as it arrived.
  (cd "$work" && apt-get source --download-only criu >/dev/null 2>&1) || true
  orig=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -n1 || true)
  [ -n "$orig" ] || die "could not download CRIU's source (apt-get source --download-only criu); check $src_list and network access to Debian's mirror"
  log "building $(basename "$orig")"
  tar -xf "$orig" -C "$work"
  dir=$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'criu*' | head -n1)
  for p in "${patches[@]}"; do
    # --forward with --reverse: "already applied" only when the whole patch reverses (with --batch alone,
    # patch ignores -R on a hunk that does not reverse and succeeds).
    if patch -d "$dir" -p1 --forward --fuzz=0 --dry-run --batch <"$p" >"$work/patch.log" 2>&1; then
      patch -d "$dir" -p1 --forward --fuzz=0 --batch --silent <"$p"
      log "applied $(basename "$p")"
    elif patch -d "$dir" -p1 --reverse --forward --fuzz=0 --dry-run --batch --silent <"$p" >/dev/null 2>&1; then
      log "$(basename "$p") is already in $(basename "$orig")"
    else
      cat "$work/patch.log" >&2
      die "$(basename "$p") does not apply to $(basename "$orig"): read the patch's description and fix the bug it names by hand, or refresh the patch"
    fi
  done
  # GITID names the patch set in `criu --version` (criu_ok checks it).
  make -C "$dir" -j"$(nproc)" GITID="$CRIU_GITID" criu >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "CRIU build failed (log above)"; }
  install -D -m 0755 "$dir/criu/criu" "$CRIU_PREFIX/criu"
  hash -r
  criu_ok "$CRIU_PREFIX/criu" || die "built CRIU at $CRIU_PREFIX/criu but it does not pass 'criu check'"
  log "installed $("$CRIU_PREFIX/criu" --version | sed -n 's/^Version: *//p') at $CRIU_PREFIX/criu"
fi
# The agents take the first criu on PATH (criu::Criu::find): another one before ours would be used instead.
have=$(command -v criu || true)
if [ -n "$have" ] && [ "$have" != "$CRIU_PREFIX/criu" ] && ! criu_ok "$have"; then
  die "$have comes before $CRIU_PREFIX/criu on PATH and lacks the fixes above: remove it, or put $CRIU_PREFIX first on PATH (or set CRIU_BIN=$CRIU_PREFIX/criu for the agents)"
fi

want=4194304
cur=$(sysctl -n fs.pipe-max-size)
if [ "$cur" -lt "$want" ]; then
  sysctl -q -w fs.pipe-max-size=$want
  log "fs.pipe-max-size raised from $cur to $want"
  # And at every boot (systemd-sysctl reads /etc/sysctl.d); a higher value set elsewhere is left alone.
  if [ -d /etc/sysctl.d ]; then
    printf '# criu dump --lazy-pages without CAP_SYS_RESOURCE (deploy/install.sh of migrate)\nfs.pipe-max-size = %s\n' \
      "$want" > /etc/sysctl.d/60-migrate-criu.conf
    log "fs.pipe-max-size kept at $want across reboots: /etc/sysctl.d/60-migrate-criu.conf"
  fi
fi

"$CRIU_PREFIX/criu" check
if [ "$(stat -f -c %T /run 2>/dev/null)" != tmpfs ]; then
  log "note: /run is not a tmpfs, so CRIU cannot keep its kernel probe (/run/criu.kdat) and redoes it at the start of every dump and restore (in a restore, about 15 ms of downtime on the test VM); a tmpfs on /run (systemd's default) avoids that, and the agents then have CRIU probe once as they start"
fi
log "done"
