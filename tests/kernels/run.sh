#!/usr/bin/env bash
# The kernel matrix: lazyfree's test binaries inside Debian 12's own kernels (6.1 and 6.12),
# booted in qemu (TCG), as root and as uid 65534. Issue #14; docs/KERNELS.md explains the
# choices and how to read the results.
#
#   bash tests/kernels/run.sh          from the repository root (or from anywhere: the repository
#                                      is found from this file's location), as root
#
# What it does, in order:
#   1. installs what it needs with apt-get (qemu-system-x86, busybox-static, cpio; gcc, make,
#      pkg-config, libpng-dev and sway-backgrounds for the C ABI tests);
#   2. finds the newest linux-image-6.1.0-*-amd64-unsigned and
#      linux-image-6.12.*+deb12-amd64-unsigned in Debian bookworm, downloads them with
#      `apt-get download` and takes their vmlinuz out with dpkg-deb (nothing is built);
#   3. builds the test binaries (`cargo test --workspace --no-run`, the same build as
#      `cargo test --workspace`) and the C programs the C ABI test runs;
#   4. packs a minimal initramfs: busybox, the test binaries at the paths they have here, the
#      shared libraries ldd lists, tests/kernels/init.sh as /init and tests/kernels/suites as
#      the plan;
#   5. boots each kernel with qemu under a hard timeout; /init runs the suites and prints one
#      "LFKM RESULT ..." line per (suite, mode, user) on the serial console, then powers off;
#   6. writes the "Tested on" table to <target>/kernel-matrix.md, one summary line per (kernel,
#      suite, mode, user) to <target>/kernel-matrix/summary.txt, the consoles to
#      <target>/kernel-matrix/<kernel>.log, and exits non-zero if any suite failed.
#
# If qemu cannot start, it prints "SKIPPED kernel matrix: <reason>" and exits non-zero.
#
# Environment:
#   LAZYFREE_KERNELS="pkg ..."   the kernel packages to test (default: the newest 6.1 and 6.12)
#   LAZYFREE_KERNELS_SUITES=f    another plan than tests/kernels/suites (same format), e.g. to
#                                repeat one failing suite
#   LAZYFREE_KERNELS_FULL=1      also run what the plan leaves out for time (10-15 minutes more
#                                per kernel)
#   LAZYFREE_KERNELS_TIMEOUT=s   hard limit per kernel boot (default 900; 3600 when full)
#   LAZYFREE_KERNELS_RELEASE=1   test a --release build instead of the test profile's
#   CARGO_TARGET_DIR             respected, as by cargo
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
suites=$(realpath "${LAZYFREE_KERNELS_SUITES:-$here/suites}")  # before the cd: a path given may be relative
cd "$repo"
export DEBIAN_FRONTEND=noninteractive CARGO_TERM_COLOR=never
t0=$SECONDS

say() { printf '\n=== kernel matrix: %s (%ss)\n' "$*" "$((SECONDS - t0))"; }
skip_all() { echo "SKIPPED kernel matrix: $*"; exit 1; }

[ "$(id -u)" = 0 ] || skip_all "run as root (apt-get installs, and the guest's files are root's)"
command -v cargo >/dev/null || { echo "cargo not found: install the stable Rust toolchain"; exit 1; }

target=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}
target=$(realpath -m "$target")  # the guest gets files at the absolute paths they have here
work=$target/kernel-matrix
mkdir -p "$work"
full=${LAZYFREE_KERNELS_FULL:-0}
if [ "$full" = 1 ]; then limit=${LAZYFREE_KERNELS_TIMEOUT:-3600}; else limit=${LAZYFREE_KERNELS_TIMEOUT:-900}; fi

# ---------------------------------------------------------------------------------------------
say "host packages"

# A private apt configuration for Debian bookworm, whatever this host runs: the kernels under test
# are bookworm's, and this keeps the host's own sources, lists and package cache untouched.
apt_dir=$work/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
bookworm=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
          -o "Dir::State::lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
          -o APT::Sandbox::User=root -o Acquire::PDiffs=false)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
{
  for suite in bookworm bookworm-updates bookworm-backports; do
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main"
  done
  echo "deb [signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main"
} > "$apt_dir/sources.list"

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# busybox-static, not busybox: the guest gets the binary alone, without libraries.
installed busybox-static || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
[ -f "$keyring" ] || need+=(debian-archive-keyring)
# The C ABI test's programs are built here, as in `cargo test`.
for tool in gcc make pkg-config; do command -v $tool >/dev/null || need+=("$tool"); done
installed libpng-dev || need+=(libpng-dev)
ls /usr/share/backgrounds/sway/*.png >/dev/null 2>&1 || need+=(sway-backgrounds)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  qemu_from=()
  if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    # An installed qemu-utils of another version than the distribution's qemu (this machine kind
    # has bookworm-backports' 10.0) Breaks the older qemu-system-common, and apt would remove it
    # to install qemu. Take qemu-system-x86 of the same version instead, from bookworm-backports
    # if that is where it comes from; --no-remove below refuses any removal anyway.
    utils=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' qemu-utils 2>/dev/null || true)
    if [[ $utils == ii* ]]; then
      v=${utils##* }
      need=("${need[@]/#qemu-system-x86/qemu-system-x86=$v}")
      if [[ $v == *bpo12* ]]; then
        apt-get "${bookworm[@]}" update -qq
        qemu_from=("${bookworm[@]}" -t bookworm-backports)
      fi
    fi
  fi
  apt-get "${qemu_from[@]}" install -y -qq --no-install-recommends --no-remove "${need[@]}" >/dev/null ||
    skip_all "apt-get could not install: ${need[*]}"
fi
command -v qemu-system-x86_64 >/dev/null || skip_all "qemu-system-x86_64 is not installed"
qemu_version=$(qemu-system-x86_64 --version 2>&1 | head -n 1) ||
  skip_all "qemu-system-x86_64 does not run: $qemu_version"
echo "$qemu_version"

# ---------------------------------------------------------------------------------------------
say "kernels"

apt-get "${bookworm[@]}" update -qq
newest() {
  apt-cache "${bookworm[@]}" search --names-only "$1" | awk '{print $1}' | sort -V | tail -n 1
}
if [ -n "${LAZYFREE_KERNELS:-}" ]; then
  read -r -a kernels <<< "$LAZYFREE_KERNELS"
else
  kernels=("$(newest '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$')"
           "$(newest '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$')")
fi
mkdir -p "$work/debs"
vmlinuz=() kversion=() keep=()
for pkg in "${kernels[@]}"; do
  [ -n "$pkg" ] || { echo "no such kernel package in bookworm"; exit 1; }
  deb=$(ls "$work/debs/${pkg}"_*.deb 2>/dev/null | tail -n 1 || true)
  if [ -z "$deb" ]; then
    (cd "$work/debs" && apt-get "${bookworm[@]}" download -qq "$pkg")
    deb=$(ls "$work/debs/${pkg}"_*.deb | tail -n 1)
  fi
  # Only /boot is needed: dpkg-deb's data archive, filtered, instead of `dpkg-deb -x` and its
  # 400 MB of modules. The guest needs no module (serial, devtmpfs, cgroups, userfaultfd are
  # built in; the initramfs is the root file system).
  dir=$work/kernels/$pkg
  if ! ls "$dir"/boot/vmlinuz-* >/dev/null 2>&1; then
    mkdir -p "$dir"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" --wildcards './boot/vmlinuz-*' './boot/config-*'
  fi
  vmlinuz+=("$(ls "$dir"/boot/vmlinuz-*)")
  kversion+=("$(dpkg-deb -f "$deb" Version)")
  echo "$pkg ${kversion[-1]}"
  keep+=("$deb")
done
# Debian replaces its kernel packages every few weeks: drop the ones no longer tested.
for deb in "$work"/debs/*.deb; do
  [[ " ${keep[*]} " == *" $deb "* ]] || rm -f "$deb"
done

# ---------------------------------------------------------------------------------------------
say "test binaries"

# The test profile (opt-level 2, debug assertions) is what `cargo test --workspace` builds: run
# after it in .ci/run, this compiles nothing new.
cargo_flags=() profile=debug
if [ "${LAZYFREE_KERNELS_RELEASE:-0}" = 1 ]; then cargo_flags=(--release) profile=release; fi
cargo test --workspace "${cargo_flags[@]}" --no-run --message-format=json-render-diagnostics \
  > "$work/build.json"
# "name path" for each integration test target (tests/*.rs, ffi/tests/*.rs).
sed -n 's/.*"target":{"kind":\["test"\],[^}]*"name":"\([^"]*\)".*"executable":"\([^"]*\)".*/\1 \2/p' \
  "$work/build.json" | sort -u > "$work/binaries"
cat "$work/binaries"
# The C programs ffi/tests/c_abi.rs runs, built as it builds them (same make command, same
# directory: c-abi-<profile> in its CARGO_TARGET_TMPDIR, <target>/tmp). In the guest a stand-in
# `make` only checks that they are there.
c_abi_dir=$target/tmp/c-abi-$profile
make -s -C examples/c all sanitize BUILD="$c_abi_dir" CARGO_TARGET_DIR="$target" \
  PROFILE=$profile CARGO=cargo

# ---------------------------------------------------------------------------------------------
say "initramfs"

rootfs=$work/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,root,etc,kt/stubs,usr/bin}
cp /bin/busybox "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"

# Every executable at the path it has here: the tests re-execute themselves through
# /proc/self/exe, c_abi finds its C programs and liblazyfree.so by the paths compiled into it,
# and png_cache-shared by its rpath. Debug info is dropped: the initramfs lives in guest RAM.
elves=()
put() {
  mkdir -p "$rootfs$(dirname "$1")"
  objcopy --strip-debug "$1" "$rootfs$1"
  elves+=("$1")
}
while read -r name path; do put "$path"; done < "$work/binaries"
for f in lazyfree_test-asan shared_test-asan png_cache-static png_cache-shared png_cache-asan \
  png_shared-static png_shared-shared png_shared-asan; do
  put "$c_abi_dir/$f"
done
put "$target/$profile/liblazyfree.so"
# The shared libraries they load (libc, libgcc_s, libasan, libubsan, libpng, ...), at ldd's paths.
for f in "${elves[@]}"; do
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
# png_cache's default images (c_abi runs it on all of them).
mkdir -p "$rootfs/usr/share/backgrounds"
cp -r /usr/share/backgrounds/sway "$rootfs/usr/share/backgrounds/"

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' \
  > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
cp "$here/init.sh" "$rootfs/init"
chmod 755 "$rootfs/init"
cp "$suites" "$rootfs/kt/suites"
cp "$work/binaries" "$rootfs/kt/binaries"

# c_abi.rs checks for cc, make and pkg-config, then runs `make all sanitize`: the programs were
# built above, so in the guest `make` only checks that what was asked for is there.
cat > "$rootfs/kt/stubs/make" <<'EOF'
#!/bin/sh
# Kernel-matrix stand-in for make: the C programs were built on the host.
build="" want=""
for a in "$@"; do
  case $a in
    BUILD=*) build=${a#BUILD=} ;;
    all) want="$want png_cache-static png_cache-shared png_shared-static png_shared-shared" ;;
    sanitize) want="$want lazyfree_test-asan shared_test-asan png_cache-asan png_shared-asan" ;;
    unit) want="$want lazyfree_test-asan shared_test-asan" ;;
    install|check|clean) echo "make stub: '$a' cannot run in the kernel-matrix guest" >&2; exit 2 ;;
  esac
done
for f in $want; do
  [ -x "$build/$f" ] || { echo "make stub: $build/$f was not built on the host" >&2; exit 2; }
done
EOF
for tool in cc pkg-config; do
  printf '#!/bin/sh\n# Kernel-matrix stand-in: the C programs were built on the host.\nexit 0\n' \
    > "$rootfs/kt/stubs/$tool"
done
# A real ldd (c_abi checks how png_cache-static and -shared are linked): the dynamic loader
# lists what it loads when LD_TRACE_LOADED_OBJECTS is set.
printf '#!/bin/sh\nfor f in "$@"; do LD_TRACE_LOADED_OBJECTS=1 "$f"; done\n' > "$rootfs/usr/bin/ldd"
chmod 755 "$rootfs"/kt/stubs/* "$rootfs/usr/bin/ldd"

# Uncompressed: TCG would spend longer decompressing it than qemu spends loading it.
(cd "$rootfs" && find . -print0 | cpio --null -o -H newc --quiet) > "$work/initramfs.cpio"
du -h "$work/initramfs.cpio" | cut -f1

# ---------------------------------------------------------------------------------------------
# Boot each kernel. The console goes to <kernel>.log; the progress lines are echoed.
: > "$work/summary.txt"
booted=() loads=()
for i in "${!kernels[@]}"; do
  kernel=$(basename "${vmlinuz[$i]}" | sed 's/^vmlinuz-//')
  log=$work/$kernel.log
  # "kernel=... debian=..." starts every summary line of this kernel.
  id="kernel=$kernel debian=${kversion[$i]}"
  say "boot $kernel (Debian ${kversion[$i]}), limit ${limit}s"
  # TCG time depends on what else the host runs: say how busy it was.
  loads+=("$kernel: $(cut -d' ' -f1-3 /proc/loadavg)")
  echo "host load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  kstart=$SECONDS
  set +e
  # -cpu max under TCG: nested KVM does not boot on this machine kind (docs/KERNELS.md).
  # -nodefaults: no VGA, NIC or option ROMs to emulate; the serial port is the console.
  # --foreground: qemu stays in this script's process group (a Ctrl-C or a kill of the group
  # reaches it); timeout still kills it at the limit.
  timeout --foreground -k 10 "$limit" qemu-system-x86_64 \
      -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
      -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
      -kernel "${vmlinuz[$i]}" -initrd "$work/initramfs.cpio" \
      -append "console=ttyS0 quiet panic=-1 lfkm.full=$full" \
      </dev/null 2>&1 | sed -u 's/\r$//' | tee "$log" |
    sed -un 's/^LFKM \(BEGIN\|RESULT\|END\) /  \1 /p'
  qemu_rc=${PIPESTATUS[0]}
  set -e
  echo "qemu exited with status $qemu_rc after $((SECONDS - kstart))s"
  if ! grep -q '^LFKM BEGIN' "$log"; then
    # Nothing ran. If qemu itself failed (not a timeout), the matrix cannot run here at all.
    if [ "$qemu_rc" != 124 ] && [ "$qemu_rc" != 137 ] && [ $((SECONDS - kstart)) -lt 60 ] &&
       grep -q 'qemu-system-x86_64:' "$log"; then
      skip_all "qemu could not start: $(grep -m 1 'qemu-system-x86_64:' "$log")"
    fi
    echo "$id suite=boot mode=- user=- passed=0 failed=1 ignored=0 skipped=0 seconds=$((SECONDS - kstart)) status=no-boot" \
      >> "$work/summary.txt"
    tail -n 30 "$log"
    continue
  fi
  booted+=("$kernel")
  sed -n "s/^LFKM RESULT /$id /p" "$log" >> "$work/summary.txt"
  # Every planned suite must have reported: a guest that died or was killed part-way fails.
  planned=$(grep -v '^[[:space:]]*\(#\|$\)' "$suites" |
    { if [ "$full" = 1 ]; then cat; else grep -v '^full[[:space:]]' || true; fi; } | wc -l)
  reported=$(grep -c '^LFKM RESULT ' "$log" || true)
  if [ "$reported" -lt "$planned" ] || ! grep -q '^LFKM END' "$log"; then
    echo "$id suite=guest mode=- user=- passed=0 failed=1 ignored=0 skipped=0 seconds=$((SECONDS - kstart)) status=incomplete($reported/$planned)" \
      >> "$work/summary.txt"
  fi
done

# ---------------------------------------------------------------------------------------------
say "report"

# The Markdown report, from summary.txt and the consoles: an overview (kernel x user x suite
# family, for a README), every suite's row, the checks tests skipped, and the failures' output.
md=$target/kernel-matrix.md
{
  echo "## Tested on"
  echo
  echo "Generated by \`bash tests/kernels/run.sh\` on $(date -u '+%Y-%m-%d'): Debian 12's own kernels in"
  echo "qemu ($(sed 's/^QEMU emulator version //' <<< "$qemu_version"); TCG, 2 vCPUs, 2 GiB), as root and as uid 65534"
  echo "(\`vm.unprivileged_userfaultfd=0\`, \`/dev/userfaultfd\` 0600: it gets \`UFFD_USER_MODE_ONLY\`)."
  echo "Each cell: tests passed, and failed if any. What each suite leaves out: \`tests/kernels/suites\`."
  echo
  awk '
    function field(name,   i) { for (i = 1; i <= NF; i++) if (index($i, name "=") == 1) return substr($i, length(name) + 2); return "" }
    {
      k = field("kernel") " (" field("debian") ")"; u = field("user"); s = field("suite"); m = field("mode")
      if (u == "nobody") u = "65534"
      # The per-mode suites and their failure-policy suites share a column.
      c = (s == "monitor" || s == "sigbus" || s == "explicit" || s == "failure") ? m : s
      if (!((k, u) in row)) { row[k, u] = 1; rows[++nrows] = k SUBSEP u }
      if (!(c in col)) { col[c] = 1; cols[++ncols] = c }
      pass[k, u, c] += field("passed"); fail[k, u, c] += field("failed"); seen[k, u, c] = 1
    }
    END {
      names["monitor"] = "monitor"; names["sigbus"] = "SIGBUS"; names["explicit"] = "explicit"
      names["cgroup-v2"] = "cgroup v2"; names["c-abi"] = "C ABI"
      names["unprivileged"] = "unprivileged (drops to 65534)"
      printf "| kernel | user |"; for (j = 1; j <= ncols; j++) printf " %s |", (cols[j] in names) ? names[cols[j]] : cols[j]
      printf "\n|---|---|"; for (j = 1; j <= ncols; j++) printf "---|"; printf "\n"
      for (i = 1; i <= nrows; i++) {
        split(rows[i], ku, SUBSEP); printf "| %s | %s |", ku[1], ku[2]
        for (j = 1; j <= ncols; j++) {
          key = rows[i] SUBSEP cols[j]
          if (!(key in seen)) printf " – |"
          else if (fail[key] > 0) printf " %d passed, **%d failed** |", pass[key], fail[key]
          else printf " %d passed |", pass[key]
        }
        printf "\n"
      }
    }' "$work/summary.txt"
  echo
  echo "### Every suite"
  echo
  echo "| kernel | suite | mode | user | passed | failed | skipped checks | time (s) | result |"
  echo "|---|---|---|---|---:|---:|---:|---:|---|"
  awk '
    function field(name,   i) { for (i = 1; i <= NF; i++) if (index($i, name "=") == 1) return substr($i, length(name) + 2); return "" }
    { u = field("user"); if (u == "nobody") u = "65534"
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", field("kernel"), field("suite"), field("mode"), u,
        field("passed"), field("failed"), field("skipped"), field("seconds"), field("status") }' "$work/summary.txt"
  echo
  echo "Host load average when each boot started: $(printf '%s; ' "${loads[@]}" | sed 's/; $//')."
  for kernel in "${booted[@]}"; do
    log=$work/$kernel.log
    if grep -q '^LFKM SKIPPED ' "$log"; then
      echo
      echo "### Checks skipped on $kernel"
      echo
      sed -n 's/^LFKM SKIPPED suite=\([^ ]*\) mode=\([^ ]*\) user=\([^ ]*\) text=SKIPPED \(.*\)/- \1 (\2, \3): \4/p' "$log" |
        sed 's/, nobody)/, 65534)/'
    fi
    if grep -q '^LFKM LOG-BEGIN ' "$log"; then
      echo
      echo "### Failures on $kernel"
      awk '/^LFKM LOG-BEGIN /{ sub(/^LFKM LOG-BEGIN /, ""); printf "\n%s:\n\n```\n", $0; on = 1; next }
           /^LFKM LOG-END/{ print "```"; on = 0; next }
           on { print }' "$log"
    fi
  done
} > "$md"
echo "wrote $md"
sed -n '/^| kernel | user/,/^$/p' "$md"

failed=$(grep -vc ' status=ok ' "$work/summary.txt" || true)
say "done: $failed failed suite(s); the report is $md"
[ "$failed" = 0 ]
