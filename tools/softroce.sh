#!/usr/bin/env bash
# Run one command inside a throw-away qemu guest that has a real soft-RoCE (rdma_rxe) device,
# so the RDMA transport's tests run against real verbs on a machine whose kernel has no RDMA.
#
#   tools/softroce.sh --setup-only                      # apt + kernel + initramfs, no boot
#   tools/softroce.sh ibv_devinfo                       # run a command in the guest
#   tools/softroce.sh bash tools/rdma-guest-tests.sh target/debug/deps/ferroplasma_transport_rdma-*
#
# The arguments are the command and its arguments (not a shell string); it runs in the guest
# in the current working directory, with the host's exported environment. Its exit status is
# this script's exit status. Other statuses: 2 = host-side setup failed, 97 = the guest died or
# the timeout killed it, 98 = the working directory is missing in the guest, 99 = guest-side
# setup (modules, mounts, rxe) failed. The guest's console is streamed to stdout as it runs.
#
# How (no disk image, nothing installed in /boot, nothing leaves the machine):
#   1. apt installs qemu, busybox-static, kmod and the rdma-core userland on the host, only
#      what is missing.
#   2. Debian's stock kernel (linux-image-amd64 -> linux-image-<ver>-amd64; the "cloud" flavour
#      has no rdma_rxe and no 9p) is fetched with `apt-get download` and unpacked into the
#      cache, never installed. Its xz bzImage is unpacked to the plain ELF vmlinux, which qemu
#      boots through the PVH entry point, so the guest skips its own (slow, emulated)
#      decompression.
#   3. A ~2.5 MB initramfs: static busybox, the ~25 modules rxe and the mounts need, their own
#      modules.dep and an /init (below).
#   4. qemu boots it with three virtio-9p shares: the host's / read-only (the guest chroots into
#      it with a tmpfs overlay on top, so it runs the host's own binaries and libraries and its
#      writes vanish at power-off), the working directory read-write at the same path, and a
#      per-run control directory (the command, its exit status).
#   5. In the guest: a dummy netdev gets a link-local address, `rdma link add` puts rxe on it,
#      and the command runs. The guest has NO network card: no packet can leave it.
#
# What the command sees in the guest (besides the host's exported environment):
#   FERROPLASMA_RDMA_DEVICE     the verbs device, rxe0
#   FERROPLASMA_RDMA_ADDR       the IPv4 address of the netdev under rxe0 (= $SOFTROCE_ADDR);
#                               servers listen on it, clients connect to it (rdma_cm works)
#   FERROPLASMA_RDMA_GID_INDEX  the index of the RoCEv2 GID carrying that address
#                               (perftest -x, ibv_rc_pingpong -g)
#   FERROPLASMA_RDMA_NETDEV     the netdev under rxe0 (rdmanet0)
# There is one device in the guest: a server and its client run in the same guest, both on
# rxe0, the client connecting to $FERROPLASMA_RDMA_ADDR (see tools/rdma-guest-tests.sh).
#
# Knobs (environment):
#   SOFTROCE_CACHE    kernel + initramfs cache (default /tmp/ferroplasma-softroce); shared by
#                     concurrent runs: the set-up holds an flock on $SOFTROCE_CACHE/lock
#   SOFTROCE_TIMEOUT  seconds before qemu is killed and the run fails (default 1500 = 25 min)
#   SOFTROCE_MEM      guest RAM in MiB (default 2048)
#   SOFTROCE_CPUS     guest vCPUs (default: the host's nproc)
#   SOFTROCE_ADDR     the rxe netdev's address (default 169.254.77.1, IPv4 link-local)
#   SOFTROCE_ACCEL    auto (default) | kvm | tcg. auto = KVM only when kvm_intel or kvm_amd is
#                     loaded: some sandboxes offer a /dev/kvm (kvm_pvm) that runs a stock kernel
#                     far slower than plain TCG emulation.
#   SOFTROCE_NO_INSTALL=1  skip the apt step (the packages must be there)
#   SOFTROCE_VERBOSE=1     show the guest kernel's boot messages
#
# Needs root (apt; the 9p export reads the whole root fs) and a Debian-like host.
set -euo pipefail

CACHE=${SOFTROCE_CACHE:-/tmp/ferroplasma-softroce}
TIMEOUT=${SOFTROCE_TIMEOUT:-1500}
MEM=${SOFTROCE_MEM:-2048}
CPUS=${SOFTROCE_CPUS:-$(nproc)}
ADDR=${SOFTROCE_ADDR:-169.254.77.1}
WORKDIR=$(pwd -P)
SELF=$(readlink -f "${BASH_SOURCE[0]}")
started=$(date +%s)

log() { printf '[softroce %3ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
fail() { log "$*"; exit 2; }

setup_only=0
if [[ ${1:-} == --setup-only ]]; then setup_only=1; shift; fi
[[ ${1:-} == -- ]] && shift
((setup_only || $# > 0)) || fail "usage: tools/softroce.sh --setup-only | COMMAND [ARG...]"
[[ $(id -u) == 0 ]] || fail "must run as root (apt, and qemu exports / over 9p)"
[[ $TIMEOUT =~ ^[0-9]+$ && $MEM =~ ^[0-9]+$ && $CPUS =~ ^[0-9]+$ ]] \
  || fail "SOFTROCE_TIMEOUT, SOFTROCE_MEM and SOFTROCE_CPUS must be whole numbers"

# --------------------------------------------------------------------------------------------
# Set-up, under an exclusive lock on the cache: two runs at once must not both download the
# kernel or write the same initramfs. Everything below is written to a temporary name and
# renamed, so a run killed half-way leaves no half-written file that looks finished.
# --------------------------------------------------------------------------------------------
mkdir -p "$CACHE"
exec {lockfd}>"$CACHE/lock"
flock -w "$TIMEOUT" "$lockfd" || fail "timed out waiting for the lock on $CACHE"
# Work directories of a set-up that was killed half-way: only a lock holder writes them.
rm -rf "$CACHE"/.kernel.* "$CACHE"/.initrd.*

# 1. Host packages. Not rdma-core: it only adds daemons and udev rules and pulls in systemd;
# the `rdma` tool comes from iproute2 and the rxe provider from ibverbs-providers.
packages=(qemu-system-x86 busybox-static kmod xz-utils iproute2 ibverbs-providers ibverbs-utils
  rdmacm-utils perftest libibverbs-dev)
if [[ ${SOFTROCE_NO_INSTALL:-0} != 1 ]]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# 2. The kernel. linux-image-amd64 is a metapackage; its first versioned dependency is the
# image itself. One directory per image package, so a kernel update adds a directory instead
# of changing one a running guest may be using.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ && !found { print $2; found = 1 }'
}
kpkg=$(kernel_package)
if [[ -z $kpkg ]]; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  kpkg=$(kernel_package)
fi
[[ -n $kpkg ]] || fail "apt cannot resolve linux-image-amd64"
kdir=$CACHE/$kpkg
if [[ ! -d $kdir ]]; then
  log "downloading and unpacking $kpkg"
  tmp=$(mktemp -d "$CACHE/.kernel.XXXXXX")
  # (as root: the _apt user cannot write into a mktemp directory)
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" >/dev/null)
  dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/root"
  kver=$(ls "$tmp/root/lib/modules")
  moddir=$tmp/root/lib/modules/$kver
  [[ -f $moddir/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko ]] || fail "$kpkg has no rdma_rxe"
  [[ -f $moddir/modules.dep ]] || depmod -b "$tmp/root" "$kver"
  # The plain ELF vmlinux sits in the bzImage as the first xz stream. tail gets SIGPIPE when
  # xz stops after that stream: its status is ignored, xz's is not.
  vmlinuz=$tmp/root/boot/vmlinuz-$kver
  offset=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1 || true)
  if [[ -n $offset ]] && { tail -c +"$((offset + 1))" "$vmlinuz" || true; } \
    | xz -dc --single-stream >"$tmp/vmlinux" 2>/dev/null; then
    log "unpacked the ELF vmlinux (PVH boot)"
  else
    log "no xz stream in the bzImage: booting it as it is (slower under emulation)"
    cp "$vmlinuz" "$tmp/vmlinux"
  fi
  echo "$kver" >"$tmp/version"
  rm -f "$tmp"/linux-image-*.deb
  mv "$tmp" "$kdir"
fi
kver=$(cat "$kdir/version")
moddir=$kdir/root/lib/modules/$kver

# 3. The initramfs, named after this script's hash: editing the script (and so /init) builds a
# new one and never rewrites a file a concurrent qemu may be loading.
initrd=$CACHE/initrd-$kver-$(sha256sum "$SELF" | cut -c1-16).cpio.gz
if [[ ! -s $initrd ]]; then
  log "building the initramfs for $kver"
  ir=$(mktemp -d "$CACHE/.initrd.XXXXXX")
  mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,newroot,lower,upper,ctl,etc}
  cp /bin/busybox "$ir/bin/busybox"
  # boot_modules are loaded by /init; on_demand ones are only copied, for the kernel to load
  # through /sbin/modprobe (busybox), e.g. `dummy` for `ip link add ... type dummy`.
  # crc32_generic: rxe computes the RoCEv2 ICRC through the crypto API; without it
  # `rdma link add` fails with "rdma_rxe: failed to init crc32 algorithm err:-2".
  boot_modules="virtio_pci 9pnet_virtio 9p overlay crc32_generic rdma_rxe ib_uverbs rdma_ucm ib_umad"
  on_demand="dummy crc32c_generic"
  # kmod's modprobe resolves the dependencies in the unpacked tree; copy each module once.
  for m in $boot_modules $on_demand; do
    modprobe -d "$kdir/root" -S "$kver" --show-depends "$m"
  done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' | while read -r ko; do
    rel=${ko#"$moddir"/}
    mkdir -p "$ir/lib/modules/$kver/$(dirname "$rel")"
    cp "$ko" "$ir/lib/modules/$kver/$rel"
  done
  cp "$moddir"/modules.{order,builtin,builtin.modinfo} "$ir/lib/modules/$kver/"
  depmod -b "$ir" "$kver"
  echo "$boot_modules" >"$ir/etc/boot-modules"
  cat >"$ir/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the guest: load the modules, mount the host's / (read-only, with a tmpfs overlay),
# the work dir and the control share, chroot and run /ctl/run.sh; its status goes to /ctl/rc.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/boot-modules); do modprobe "$m" || echo "softroce: modprobe $m failed"; done
die() { echo "softroce: $*"; echo 99 > /ctl/rc 2>/dev/null; sync; reboot -f; }
O=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o "$O" ctl /ctl || die "cannot mount the control share"
read -r WORKDIR < /ctl/workdir
mount -t 9p -o "$O,ro,cache=loose" hostroot /lower || die "cannot mount the host's root"
mount -t tmpfs -o mode=755 tmpfs /upper
mkdir -p /upper/u /upper/w
if ! mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot; then
  echo "softroce: overlayfs failed, the root stays read-only"
  mount --bind /lower /newroot
fi
R=/newroot
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=755 tmpfs $R/run
mount --move /proc $R/proc
mount --move /sys $R/sys
mount --move /dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mkdir -p "$R$WORKDIR" 2>/dev/null
mount -t 9p -o "$O" work "$R$WORKDIR" || die "cannot mount the work dir $WORKDIR"
cp /ctl/run.sh $R/tmp/.softroce-run.sh
chroot $R /bin/bash /tmp/.softroce-run.sh
echo $? > /ctl/rc
sync
reboot -f
INIT
  chmod +x "$ir/init"
  (cd "$ir" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$ir.cpio.gz"
  mv "$ir.cpio.gz" "$initrd"
  rm -rf "$ir"
  # Initramfs files of other versions of this script, unused for an hour: qemu reads its
  # initramfs when it starts, seconds after the set-up, so no guest still needs them.
  find "$CACHE" -maxdepth 1 -name 'initrd-*.cpio.gz' ! -path "$initrd" -mmin +60 -delete
fi
touch "$initrd" # its mtime is its last use, for the clean-up above
flock -u "$lockfd"

if ((setup_only)); then
  log "set-up done: $kpkg ($kver), cache $CACHE"
  exit 0
fi

# --------------------------------------------------------------------------------------------
# 4. The per-run control directory (its own temp dir: concurrent runs share nothing writable)
# holding the work dir's path, the guest-side script and, at the end, the command's status.
# --------------------------------------------------------------------------------------------
ctl=$(mktemp -d "${TMPDIR:-/tmp}/softroce-run.XXXXXX")
trap 'rm -rf "$ctl"' EXIT
printf '%s\n' "$WORKDIR" >"$ctl/workdir"
{
  echo '#!/bin/bash'
  # The host's exported environment (cargo, rustup, RUST_* ...), minus what describes this
  # shell or terminal.
  while IFS= read -r v; do
    [[ $v =~ ^(PWD|OLDPWD|SHLVL|_|TERM|TMPDIR|DISPLAY|SSH_.*|XDG_.*|BASH_.*)$ ]] && continue
    printf 'export %s=%q\n' "$v" "${!v}"
  done < <(compgen -e)
  # shellcheck disable=SC2016 # expanded in the guest
  echo 'export HOME=${HOME:-/root} TERM=dumb'
  printf 'export FERROPLASMA_RDMA_ADDR=%q\n' "$ADDR"
  cat <<'GUEST'
# rxe on a dummy netdev with a link-local address: rdma_cm needs a real (non-loopback)
# address to resolve a route, and the guest has no network card, so nothing can leave it.
fail() { echo "[softroce] guest set-up failed: $*"; exit 99; }
netdev=rdmanet0
ip link set lo up || fail "lo"
ip link add "$netdev" type dummy || fail "ip link add $netdev type dummy"
ip addr add "$FERROPLASMA_RDMA_ADDR/16" dev "$netdev" || fail "ip addr add $FERROPLASMA_RDMA_ADDR"
ip link set "$netdev" up || fail "ip link set $netdev up"
rdma link add rxe0 type rxe netdev "$netdev" || fail "rdma link add rxe0"
[[ -e /dev/infiniband/uverbs0 ]] || fail "/dev/infiniband/uverbs0 missing"
# The GID table fills in asynchronously once the address is there: wait (10 s at most) for
# the RoCEv2 GID that carries the IPv4 address (::ffff:a.b.c.d). It is among the first few
# of the table's 1024 entries (0 is the netdev's IPv6 link-local address).
gid_index=
ports=/sys/class/infiniband/rxe0/ports/1
for _ in $(seq 100); do
  for i in $(seq 0 15); do
    if [[ $(cat "$ports/gids/$i" 2>/dev/null) == 0000:0000:0000:0000:0000:ffff:* &&
      $(cat "$ports/gid_attrs/types/$i" 2>/dev/null) == "RoCE v2" ]]; then
      gid_index=$i
      break 2
    fi
  done
  sleep 0.1
done
[[ -n $gid_index ]] || fail "no RoCEv2 GID for $FERROPLASMA_RDMA_ADDR on rxe0"
export FERROPLASMA_RDMA_DEVICE=rxe0 FERROPLASMA_RDMA_NETDEV=$netdev
export FERROPLASMA_RDMA_GID_INDEX=$gid_index
echo "[softroce] rxe0 on $netdev ready: addr $FERROPLASMA_RDMA_ADDR, gid index $gid_index, kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"
GUEST
  printf 'cd %q || exit 98\n' "$WORKDIR"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$ctl/run.sh"

# --------------------------------------------------------------------------------------------
# 5. Boot.
# --------------------------------------------------------------------------------------------
accel=${SOFTROCE_ACCEL:-auto}
if [[ $accel == auto ]]; then
  if [[ -w /dev/kvm && (-d /sys/module/kvm_intel || -d /sys/module/kvm_amd) ]]; then
    accel=kvm
  else
    accel=tcg
  fi
fi
case $accel in
  # -arch-capabilities: under nested KVM qemu may be refused MSR 0x10a and abort.
  kvm) accel_args=(-accel kvm -cpu 'host,-arch-capabilities') ;;
  tcg) accel_args=(-accel 'tcg,thread=multi' -cpu max) ;;
  *) fail "SOFTROCE_ACCEL must be auto, kvm or tcg" ;;
esac
# no_timer_check: under TCG on a busy host the IO-APIC timer self-test can fail and panic
# ("IO-APIC + timer doesn't work!"). panic=-1 + -no-reboot: a panic ends qemu at once.
append="console=ttyS0 panic=-1 rdinit=/init no_timer_check"
[[ ${SOFTROCE_VERBOSE:-0} == 1 ]] || append+=" quiet loglevel=1"

log "booting $kver ($accel, $MEM MiB, $CPUS vCPU, timeout ${TIMEOUT}s), work dir $WORKDIR"
# -nodefaults and -nic none: no network card at all. The serial console is the guest's
# stdout: its CRLFs are stripped by sed -u (unbuffered, so a kill loses no output).
set +e
timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 \
  -M q35 "${accel_args[@]}" -m "$MEM" -smp "$CPUS" \
  -nodefaults -no-user-config -nic none -display none -no-reboot \
  -serial stdio -monitor none \
  -kernel "$kdir/vmlinux" -initrd "$initrd" -append "$append" \
  -fsdev local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot \
  -fsdev local,id=fswork,path="$WORKDIR",security_model=none \
  -device virtio-9p-pci,fsdev=fswork,mount_tag=work \
  -fsdev local,id=fsctl,path="$ctl",security_model=none \
  -device virtio-9p-pci,fsdev=fsctl,mount_tag=ctl \
  </dev/null | sed -u -e 's/\r$//' -e '/] reboot: Restarting system$/d'
qemu_status=${PIPESTATUS[0]}
set -e
if [[ -s $ctl/rc ]]; then
  rc=$(cat "$ctl/rc")
elif ((qemu_status == 124 || qemu_status == 137)); then
  log "timed out after ${TIMEOUT}s: qemu killed"
  rc=97
else
  log "the guest ended without a result (qemu exit status $qemu_status)"
  rc=97
fi
log "command exit status $rc"
exit "$rc"
