#!/bin/sh
# Install (or upgrade, or remove) the emp worker: the single-file `emp-worker` binary, an
# environment file with the hub URL, token and connectors, and a supervisord config that
# runs one worker per GPU. See docs/install.md.
#
#   sh install.sh --hub-url wss://hub.example.com --token TOKEN [--connectors a,b]
#   sh install.sh --version 0.2.0        # a given release (default: the latest)
#   sh install.sh --uninstall
#
# Every download is checked before anything is installed: SHA256SUMS must carry a valid
# signature by the release key pinned below (ssh-keygen -Y verify), and the binary must
# match its line in SHA256SUMS. Any failure stops with one line on stderr, exit status 1,
# and leaves the install prefix as it was.
set -eu

# The release public key (installer/release-key.pub), pinned.
RELEASE_KEY='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDfyrGaHbyDpVEfYu+4pCBkYGYeUDJQeGNRE34QHru/4 releases@emp'
SIGNER=releases@emp
NAMESPACE=emp-release
REPO_URL=https://github.com/emp-ai/emp/releases

usage() {
  cat <<'USAGE'
usage: install.sh [options]

Installs the emp worker binary under PREFIX/bin, its settings in PREFIX/etc/worker.env
(mode 0600), a supervisord config in PREFIX/etc/supervisord.conf (one worker per GPU),
logs under PREFIX/log. Run it again to upgrade: running workers are drained first.

  --hub-url URL          the hub (EMP_HUB_URL), e.g. wss://hub.example.com
  --token TOKEN          the worker token (EMP_TOKEN)
  --connectors A,B       connectors to enable (EMP_CONNECTORS; default: all bundled)
  --gpus LIST            GPU indexes for the workers, or 'none' (default: every GPU found)
  --version X            the release to install (default: the latest)
  --prefix DIR           where to install (default: /opt/emp as root,
                         ~/.local/share/emp otherwise; env EMP_INSTALL_PREFIX)
  --base-url URL         download from this release directory (a mirror) instead of
                         GitHub (env EMP_INSTALL_BASE_URL)
  --allowed-signers FILE check SHA256SUMS.sig against this ssh allowed-signers file
                         instead of the pinned release key (a mirror that signs its
                         own releases; env EMP_INSTALL_ALLOWED_SIGNERS)
  --uninstall            stop the workers and remove what the installer put in PREFIX
  --dry-run              download and verify, then say what would change; change nothing
  -h, --help             this text
USAGE
}

fail() {
  echo "install.sh: $*" >&2
  exit 1
}

say() {
  echo "install.sh: $*"
}

# -- options ---------------------------------------------------------------------------------
version=
hub_url=
token=
connectors=
gpus=
set_hub_url=0
set_token=0
set_connectors=0
uninstall=0
dry_run=0
base_url=${EMP_INSTALL_BASE_URL:-}
allowed_signers=${EMP_INSTALL_ALLOWED_SIGNERS:-}
if [ "$(id -u)" = 0 ]; then
  prefix=${EMP_INSTALL_PREFIX:-/opt/emp}
else
  prefix=${EMP_INSTALL_PREFIX:-${XDG_DATA_HOME:-$HOME/.local/share}/emp}
fi

need_value() {
  [ "$2" -ge 2 ] || fail "$1 needs a value (see --help)"
}

while [ "$#" -gt 0 ]; do
  case $1 in
    --hub-url) need_value "$1" "$#"; hub_url=$2; set_hub_url=1; shift 2 ;;
    --token) need_value "$1" "$#"; token=$2; set_token=1; shift 2 ;;
    --connectors) need_value "$1" "$#"; connectors=$2; set_connectors=1; shift 2 ;;
    --gpus) need_value "$1" "$#"; gpus=$2; shift 2 ;;
    --version) need_value "$1" "$#"; version=${2#v}; shift 2 ;;
    --prefix) need_value "$1" "$#"; prefix=$2; shift 2 ;;
    --base-url) need_value "$1" "$#"; base_url=$2; shift 2 ;;
    --allowed-signers) need_value "$1" "$#"; allowed_signers=$2; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) fail "unknown option: $1 (see --help)" ;;
  esac
done

for value in "$hub_url" "$token" "$connectors" "$prefix"; do
  case $value in *'
'*) fail "a value with a line break: refused" ;;
  esac
done
case $prefix in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
prefix=${prefix%/}

bin=$prefix/bin/emp-worker
etc=$prefix/etc
env_file=$etc/worker.env
conf=$etc/supervisord.conf

# -- supervisord -----------------------------------------------------------------------------
ctl() {
  supervisorctl -c "$conf" "$@"
}

supervisor_running() {
  [ -f "$conf" ] && command -v supervisorctl >/dev/null 2>&1 && ctl pid >/dev/null 2>&1
}

stop_workers() {
  say "draining the running workers (supervisorctl stop emp:*)"
  ctl stop 'emp:*' >/dev/null || fail "supervisorctl stop failed; nothing was changed"
}

# -- uninstall -------------------------------------------------------------------------------
if [ "$uninstall" = 1 ]; then
  if [ "$dry_run" = 1 ]; then
    supervisor_running && say "would drain the workers and stop supervisord ($conf)"
    for path in "$bin" "$env_file" "$conf" "$prefix/log"/*.log*; do
      [ -e "$path" ] && say "would remove $path"
    done
    exit 0
  fi
  if supervisor_running; then
    stop_workers
    pid=$(ctl pid)
    ctl shutdown >/dev/null || fail "supervisorctl shutdown failed"
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 60 ]; do
      tries=$((tries + 1))
      sleep 1
    done
  fi
  rm -f "$bin" "$env_file" "$conf" "$prefix/run/supervisord.pid" "$prefix/run/supervisor.sock"
  rm -f "$prefix"/log/supervisord.log* "$prefix"/log/gpu*.log* "$prefix"/log/cpu.log*
  for dir in "$prefix/bin" "$etc" "$prefix/log" "$prefix/run" "$prefix"; do
    [ -d "$dir" ] && rmdir "$dir" 2>/dev/null || true
  done
  say "removed the emp worker from $prefix"
  exit 0
fi

# -- platform and tools ----------------------------------------------------------------------
os=${EMP_INSTALL_UNAME_S:-$(uname -s)}
arch=${EMP_INSTALL_UNAME_M:-$(uname -m)}
case $os in
  Linux) os=linux ;;
  Darwin) os=macos ;;
  *) fail "unsupported operating system: $os (releases are built for Linux and macOS)" ;;
esac
case $arch in
  x86_64 | amd64) arch=x86_64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) fail "unsupported architecture: $arch (releases are built for x86_64 and arm64)" ;;
esac
case $os-$arch in
  linux-x86_64 | linux-arm64 | macos-arm64) ;;
  *) fail "unsupported platform: $os $arch (releases: linux x86_64, linux arm64, macos arm64)" ;;
esac

if command -v curl >/dev/null 2>&1; then
  fetch() { curl -fsSL --retry 2 -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
  fetch() { wget -q -O "$2" "$1"; }
else
  fail "neither curl nor wget found: install one of them"
fi
command -v ssh-keygen >/dev/null 2>&1 ||
  fail "ssh-keygen not found: install OpenSSH (openssh-client) to check the release signature"
if command -v sha256sum >/dev/null 2>&1; then
  sha256() { sha256sum "$1" | cut -d ' ' -f 1; }
elif command -v shasum >/dev/null 2>&1; then
  sha256() { shasum -a 256 "$1" | cut -d ' ' -f 1; }
else
  fail "neither sha256sum nor shasum found: install coreutils"
fi

if [ -z "$base_url" ]; then
  if [ -n "$version" ]; then
    base_url=$REPO_URL/download/v$version
  else
    base_url=$REPO_URL/latest/download
  fi
fi
base_url=${base_url%/}

# -- download and verify (in a temporary folder; PREFIX untouched) ---------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/emp-install.XXXXXX") || fail "cannot make a temporary folder"
staged=
cleanup() {
  rm -rf "$work"
  [ -z "$staged" ] || rm -f "$staged"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

# download URL FILE [WHY]: fail with the downloader's reason (and WHY).
download() {
  fetch "$1" "$2" 2>"$work/fetch.log" || {
    reason=$(tail -n 1 "$work/fetch.log")
    fail "cannot download $1${3:-}${reason:+ ($reason)}"
  }
}
download "$base_url/SHA256SUMS" "$work/SHA256SUMS"
download "$base_url/SHA256SUMS.sig" "$work/SHA256SUMS.sig" ": refusing an unsigned release"
if [ -n "$allowed_signers" ]; then
  [ -r "$allowed_signers" ] || fail "cannot read the allowed-signers file: $allowed_signers"
  cp "$allowed_signers" "$work/allowed_signers"
else
  echo "$SIGNER namespaces=\"$NAMESPACE\" $RELEASE_KEY" >"$work/allowed_signers"
fi
ssh-keygen -Y verify -f "$work/allowed_signers" -I "$SIGNER" -n "$NAMESPACE" \
  -s "$work/SHA256SUMS.sig" <"$work/SHA256SUMS" >"$work/verify.log" 2>&1 ||
  fail "the signature of SHA256SUMS does not verify: $(head -n 1 "$work/verify.log")"

# The binary for this platform, named in the (now trusted) SHA256SUMS.
pattern="emp-worker-${version:-*}-$os-$arch"
name=
expected=
while read -r sum file; do
  file=${file#\*}
  # shellcheck disable=SC2254  # the pattern is a glob on purpose
  case $file in
    $pattern) name=$file; expected=$sum ;;
  esac
done <"$work/SHA256SUMS"
[ -n "$name" ] || fail "no $pattern in $base_url/SHA256SUMS: no release for $os $arch"
case $name in */* | .*) fail "a strange file name in SHA256SUMS: $name" ;; esac
release=${name#emp-worker-}
release=${release%-"$os"-"$arch"}

download "$base_url/$name" "$work/$name"
actual=$(sha256 "$work/$name")
[ "$actual" = "$expected" ] ||
  fail "$name does not match SHA256SUMS (got $actual, expected $expected): refused"
chmod 755 "$work/$name"
"$work/$name" --version >"$work/version.txt" 2>&1 ||
  fail "the downloaded binary does not run here: $(head -n 1 "$work/version.txt")"

upgrade=0
[ -e "$bin" ] && upgrade=1
if [ "$dry_run" = 1 ]; then
  say "verified $name (release $release, sha256 $actual)"
  if [ "$upgrade" = 1 ]; then
    say "would replace $bin"
  else
    say "would install $bin"
  fi
  supervisor_running && say "would drain the workers first and start them again after"
  say "would write $env_file and $conf"
  exit 0
fi

# -- install ---------------------------------------------------------------------------------
mkdir -p "$prefix/bin" "$etc" "$prefix/log" "$prefix/run" ||
  fail "cannot create folders under $prefix"
staged=$prefix/bin/.emp-worker.$$.tmp
{ cp "$work/$name" "$staged" && chmod 755 "$staged"; } || fail "cannot write $staged"

# The environment file: kept as it is, but for the keys given on this command line.
if [ "$set_hub_url$set_token$set_connectors" != 000 ] || [ ! -e "$env_file" ]; then
  (
    umask 077
    if [ -e "$env_file" ]; then
      grep -v -e '^EMP_HUB_URL=' -e '^EMP_TOKEN=' -e '^EMP_CONNECTORS=' "$env_file" || true
    else
      echo "# emp worker settings, read by every worker at start (EMP_ENV_FILE); KEY=VALUE."
      echo "# See docs/configuration.md for the settings."
    fi
    if [ "$set_hub_url" = 1 ]; then
      echo "EMP_HUB_URL=$hub_url"
    elif [ -e "$env_file" ]; then
      grep '^EMP_HUB_URL=' "$env_file" || true
    fi
    if [ "$set_token" = 1 ]; then
      echo "EMP_TOKEN=$token"
    elif [ -e "$env_file" ]; then
      grep '^EMP_TOKEN=' "$env_file" || true
    fi
    if [ "$set_connectors" = 1 ]; then
      echo "EMP_CONNECTORS=$connectors"
    elif [ -e "$env_file" ]; then
      grep '^EMP_CONNECTORS=' "$env_file" || true
    fi
  ) >"$env_file.tmp" || fail "cannot write $env_file"
  chmod 600 "$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
fi

# The supervisord config, from the new binary (the drain timeout comes from the env file).
set -- --binary "$bin" --env-file "$env_file" --log-dir "$prefix/log" --run-dir "$prefix/run"
[ -z "$gpus" ] || set -- "$@" --gpus "$gpus"
EMP_ENV_FILE='' "$staged" supervisor-config "$@" >"$conf.tmp" 2>"$work/config.log" || {
  rm -f "$conf.tmp"
  fail "supervisor-config failed: $(head -n 1 "$work/config.log")"
}

running=0
if supervisor_running; then
  running=1
  stop_workers
fi
mv "$staged" "$bin"
staged=
mv "$conf.tmp" "$conf"
if [ "$running" = 1 ]; then
  # A changed config (other GPUs) replaces the group; then everything is started again.
  { ctl reread && ctl update && { ctl start 'emp:*' || true; }; } >/dev/null 2>&1
  tries=0
  until ctl status 'emp:*' >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -le 60 ] ||
      fail "installed $release, but the workers did not start again: see $prefix/log"
    sleep 1
  done
  say "upgraded to $release; the workers run again (supervisorctl -c $conf status)"
elif [ "$upgrade" = 1 ]; then
  say "upgraded $bin to $release"
else
  say "installed $bin ($release)"
fi
if [ "$running" = 0 ]; then
  if command -v supervisord >/dev/null 2>&1; then
    say "start the workers: supervisord -c $conf"
  else
    say "install supervisor (e.g. pip install supervisor), then: supervisord -c $conf"
  fi
fi
