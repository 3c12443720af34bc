#!/bin/sh
# Sign a release directory: writes DIR/SHA256SUMS (sha256sum format, one line per release
# file) and DIR/SHA256SUMS.sig (ssh-keygen -Y sign, namespace emp-release).
#
#   scripts/sign-release.sh DIR KEY
#
# KEY is the private key file (an ed25519 key; the public half is installer/release-key.pub).
# Check the result with:
#   ssh-keygen -Y verify -f allowed_signers -I releases@emp -n emp-release \
#     -s DIR/SHA256SUMS.sig < DIR/SHA256SUMS
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: $0 DIR KEY" >&2
  exit 2
fi
dir=$1
key=$2
[ -d "$dir" ] || { echo "sign-release: no such directory: $dir" >&2; exit 2; }
[ -r "$key" ] || { echo "sign-release: cannot read the key: $key" >&2; exit 2; }
case $key in /*) ;; *) key=$(pwd)/$key ;; esac
if command -v sha256sum >/dev/null 2>&1; then
  sha() { sha256sum "$@"; }
else
  sha() { shasum -a 256 "$@"; }
fi

cd "$dir"
rm -f SHA256SUMS SHA256SUMS.sig SHA256SUMS.tmp
found=0
for file in *; do
  [ -f "$file" ] || continue
  case $file in SHA256SUMS*) continue ;; esac
  sha "$file" >>SHA256SUMS.tmp
  found=1
done
[ "$found" = 1 ] || { rm -f SHA256SUMS.tmp; echo "sign-release: no files in $dir" >&2; exit 2; }
mv SHA256SUMS.tmp SHA256SUMS
ssh-keygen -q -Y sign -f "$key" -n emp-release SHA256SUMS
echo "signed $(wc -l <SHA256SUMS | tr -d ' ') file(s): $dir/SHA256SUMS, $dir/SHA256SUMS.sig"
