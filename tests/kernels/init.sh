#!/bin/sh
# /init of the kernel-matrix guest (busybox sh). Built into the initramfs by tests/kernels/run.sh:
# mounts what the tests need, runs the suites listed in /kt/suites and prints machine-readable
# lines on the serial console, each starting with "LFKM ", which run.sh parses:
#
#   LFKM BEGIN kernel=<uname -r> cpus=<n> mem_kib=<n> uffd_sysctl=<0|1> uffd_node=<mode> ...
#   LFKM TEST suite=<s> mode=<m> user=<u> test=<name> result=<ok|FAILED|ignored>
#   LFKM SKIPPED suite=<s> mode=<m> user=<u> text=<the test's SKIPPED line>
#   LFKM RESULT suite=<s> mode=<m> user=<u> passed=<n> failed=<n> ignored=<n> skipped=<n> seconds=<t> status=<ok|failed|timeout|crashed> exit=<n>
#   LFKM LOG-BEGIN suite=<s> mode=<m> user=<u>   ... the failures' output ...   LFKM LOG-END
#   LFKM END
#
# Then it powers off. Nothing here may hang: each suite runs under a SIGKILL timeout in its own
# session, and run.sh also kills qemu after a hard limit.

export PATH=/kt/stubs:/bin:/sbin:/usr/bin
/bin/busybox --install -s /bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp
# /tmp stays the initramfs' own directory (already in memory, writable): a tmpfs mounted over it
# would hide the test binaries of a checkout that lives under /tmp on the host.
chmod 1777 /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# cgroup v2 with the memory controller enabled for child groups: the cgroup pressure tests make
# their own group under the root and set memory.max there.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
# A distribution's defaults for userfaultfd, stated rather than assumed: the sysctl at 0 and
# /dev/userfaultfd (Linux >= 6.1) root-only. uid 65534 then gets UFFD_USER_MODE_ONLY.
sysctl -qw vm.unprivileged_userfaultfd=0 2>/dev/null
[ -e /dev/userfaultfd ] && chmod 0600 /dev/userfaultfd
# The tests' temporary files go to /tmp, writable by uid 65534 too.
export TMPDIR=/tmp HOME=/root
cd /tmp

# Options from run.sh (kernel command line): lfkm.full=1 runs what is skipped for time.
FULL=0
grep -q 'lfkm.full=1' /proc/cmdline && FULL=1

uptime_s() { cut -d' ' -f1 /proc/uptime; }

node_mode=absent
[ -e /dev/userfaultfd ] && node_mode=$(stat -c %a /dev/userfaultfd)
echo
echo "LFKM BEGIN kernel=$(uname -r) cpus=$(nproc)" \
  "mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)" \
  "uffd_sysctl=$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || echo none)" \
  "uffd_node=$node_mode full=$FULL uptime=$(uptime_s)"

# run_suite SUITE MODE USER TIMEOUT BINARY ARGS...
run_suite() {
  suite=$1 mode=$2 user=$3 limit=$4 bin=$5
  shift 5
  tag="suite=$suite mode=$mode user=$user"
  exe=$(sed -n "s/^$bin //p" /kt/binaries)
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then
    echo "LFKM RESULT $tag passed=0 failed=1 ignored=0 skipped=0 seconds=0 status=crashed"
    echo "LFKM LOG-BEGIN $tag"; echo "no test binary for '$bin' in the initramfs"; echo "LFKM LOG-END"
    return
  fi
  # "~name" is a skip for time only (see /kt/suites): a --skip unless the run is full.
  # NAME=value sets an environment variable for the suite.
  args="" envs=""
  for a in "$@"; do
    case $a in
      "~"*) [ $FULL = 1 ] || args="$args --skip ${a#\~}" ;;
      [A-Z]*=*) envs="$envs $a" ;;
      *) args="$args $a" ;;
    esac
  done
  [ $FULL = 1 ] && limit=$((limit * 4))
  out=/tmp/lfkm.out err=/tmp/lfkm.err
  rm -f $out $err
  start=$(uptime_s)
  # timeout (busybox: keeps PROG's pid) -> setsid (a new session, so the whole group of test
  # children can be killed) -> [su to uid 65534] -> env -> the libtest harness.
  if [ "$user" = root ]; then
    timeout -s KILL "$limit" setsid env $envs "$exe" --test-threads=1 $args >$out 2>$err </dev/null &
  else
    timeout -s KILL "$limit" setsid su -s /bin/sh "$user" -c "cd /tmp && exec env $envs $exe --test-threads=1 $args" >$out 2>$err </dev/null &
  fi
  pid=$!
  wait $pid
  rc=$?
  kill -KILL -- -$pid 2>/dev/null  # leftovers of a killed or crashed run
  end=$(uptime_s)
  secs=$(awk "BEGIN { printf \"%.1f\", $end - $start }")

  # libtest's own lines are on stdout ("test NAME ... ok"); the tests' SKIPPED lines go to
  # stderr, past the capture, so the two never mix.
  # (Up to the "failures:" section: a failed test's output may quote a child's libtest lines.)
  sed -n '/^failures:$/q; s/^test \(.*\) \.\.\. \(ok\|FAILED\|ignored.*\)$/\1 \2/p' $out | while read -r name res; do
    echo "LFKM TEST $tag test=$name result=${res%%,*}"
  done
  grep '^SKIPPED' $err | while read -r line; do echo "LFKM SKIPPED $tag text=$line"; done
  skipped=$(grep -c '^SKIPPED' $err)
  summary=$(grep '^test result:' $out | tail -n 1)
  if [ -n "$summary" ]; then
    passed=$(echo "$summary" | sed -n 's/.* \([0-9]*\) passed.*/\1/p')
    failed=$(echo "$summary" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
    ignored=$(echo "$summary" | sed -n 's/.* \([0-9]*\) ignored.*/\1/p')
    status=ok
    [ "$failed" = 0 ] && [ $rc = 0 ] || status=failed
    # As in .ci/run: the memory cgroup test must run here, a skip of it is a failure.
    case $suite in
      cgroup*) [ "$skipped" = 0 ] || { status=failed passed=$((passed - 1)) failed=$((failed + 1)); } ;;
    esac
  else
    # No summary: killed by the timeout, or the harness itself died (an abort, a signal).
    passed=$(grep -c '^test .* \.\.\. ok$' $out)
    failed=$(grep -c '^test .* \.\.\. FAILED$' $out)
    ignored=$(grep -c '^test .* \.\.\. ignored' $out)
    failed=$((failed + 1))
    status=crashed
    # SIGKILL at the limit is the timeout; earlier, someone else's (the OOM killer's).
    if [ $rc = 137 ] && awk "BEGIN { exit !($secs >= $limit - 1) }"; then
      status=timeout
    fi
    running=$(tail -n 1 $out | sed -n 's/^test \(.*\) \.\.\. *$/\1/p')
    [ -n "$running" ] && echo "LFKM TEST $tag test=$running result=$status"
  fi
  echo "LFKM RESULT $tag passed=$passed failed=$failed ignored=$ignored skipped=$skipped seconds=$secs status=$status exit=$rc"
  if [ $status != ok ]; then
    echo "LFKM LOG-BEGIN $tag"
    if [ -n "$summary" ]; then
      # libtest's "failures:" section: each failed test's captured output and panic message.
      sed -n '/^failures:$/,/^test result:/p' $out | head -n 600
    else
      echo "--- exit status $rc after ${secs}s (limit ${limit}s); last lines of stdout:"
      tail -n 60 $out
      echo
    fi
    echo "--- last lines of stderr:"
    tail -n 60 $err
    echo "LFKM LOG-END"
  fi
}

# The plan: comments and blank lines skipped; "full ..." lines only in a full run.
grep -v '^[[:space:]]*\(#\|$\)' /kt/suites | while read -r first rest; do
  if [ "$first" = full ]; then
    [ $FULL = 1 ] || continue
    set -- $rest
  else
    set -- $first $rest
  fi
  run_suite "$@"
done

echo "LFKM END uptime=$(uptime_s)"
sync
poweroff -f
