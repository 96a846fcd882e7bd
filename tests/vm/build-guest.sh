#!/bin/bash
# Builds the tiny test guest: Debian's cloud kernel (taken from the .deb, not installed) and
# a busybox initramfs whose /init loads virtio_net, gets an address by DHCP (udhcpc),
# serves "vm-guest-ok NAME IP" over HTTP on :80 and echoes UDP on :53535.
# Usage: build-guest.sh OUTDIR     (cached: does nothing if OUTDIR is complete)
set -euo pipefail
OUT=$1
STAMP=$(sha256sum "$0" | cut -c1-16)
[ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ] && exit 0
WORK=$OUT/work
export SOURCE_DATE_EPOCH=1700000000
mkdir -p "$OUT" "$WORK/debs"
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
KPKG=${KPKG:-$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')}
KVER=${KPKG#linux-image-}
ls "$WORK/debs/${KPKG}"_*.deb >/dev/null 2>&1 || (cd "$WORK/debs" && apt-get download "$KPKG" >/dev/null)
rm -rf "$WORK/kx"; mkdir -p "$WORK/kx"
dpkg-deb -x "$WORK/debs/${KPKG}"_*.deb "$WORK/kx"
MODDIR=$WORK/kx/lib/modules/$KVER
R=$WORK/rootfs
rm -rf "$R"; mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,run,tmp,www,lib/modules,usr/share/udhcpc}
install -m 0755 /bin/busybox "$R/bin/busybox"
declare -A seen=(); ORDER=()
add_mod() {
  local m=$1 f d
  [[ -n ${seen[$m]:-} ]] && return; seen[$m]=1
  f=$(find "$MODDIR" -name "$m.ko" -print -quit); [[ -n $f ]] || { echo "module $m not found" >&2; exit 1; }
  for d in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$d"; done
  install -m 0644 "$f" "$R/lib/modules/$m.ko"; ORDER+=("$m")
}
for m in virtio_pci virtio_net; do add_mod "$m"; done
printf '%s\n' "${ORDER[@]}" > "$R/etc/modules.order"
cat > "$WORK/udpecho.c" <<'C'
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(argc > 1 ? atoi(argv[1]) : 53535) };
  if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("udpecho"); return 1; }
  for (;;) {
    char buf[2048]; struct sockaddr_in p; socklen_t pl = sizeof p;
    ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&p, &pl);
    if (n >= 0) sendto(s, buf, n, 0, (struct sockaddr *)&p, pl);
  }
}
C
gcc -static -Os -s -o "$R/bin/udpecho" "$WORK/udpecho.c"
cat > "$R/usr/share/udhcpc/default.script" <<'S'
#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    if [ -n "$router" ]; then route del default 2>/dev/null; route add default gw ${router%% *} dev "$interface"; fi ;;
esac
exit 0
S
chmod 0755 "$R/usr/share/udhcpc/default.script"
cat > "$R/init" <<'S'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko; done
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set lo up; ip link set eth0 up
NAME=$(cat /proc/cmdline | tr ' ' '\n' | sed -n 's/^vgname=//p')
udhcpc -i eth0 -s /usr/share/udhcpc/default.script -t 100 -T 1 -A 1 -x hostname:${NAME:-guest}
IP=$(ip -4 -o addr show eth0 | awk '{print $4}')
echo "vm-guest-ok ${NAME} ${IP%/*}" > /www/index.html
httpd -p 80 -h /www
udpecho 53535 &
echo "GUEST READY ${NAME} ${IP}"
# vgprobe=HOST:PORT: fetch that URL every second and report on the console, so a test can
# see what this guest reaches (e.g. another guest's forward through the public address)
PROBE=$(cat /proc/cmdline | tr ' ' '\n' | sed -n 's/^vgprobe=//p')
while :; do
  # (busybox-static's wget crashes; nc does the same job)
  if [ -n "$PROBE" ]; then echo "PROBE $(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 ${PROBE%:*} ${PROBE#*:} 2>&1 | tail -n 1)"; fi
  sleep 1
done
S
chmod 0755 "$R/init"
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n > "$OUT/initrd.gz.tmp"
install -m 0644 "$WORK/kx/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
echo "$STAMP" > "$OUT/stamp"
rm -rf "$WORK/kx" "$R"
echo "guest: $KPKG, modules: ${ORDER[*]}"
