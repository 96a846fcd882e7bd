#!/bin/bash
# Idempotent host setup so libvirtd + QEMU run without systemd (containers, CI VMs):
# users/groups libvirt-daemon-system would create, qemu.conf (QEMU as root, no sVirt, no
# cgroups), directories, /dev/net/tun, the default network definition. No network changes.
set -euo pipefail
getent group kvm          >/dev/null || groupadd -r kvm
getent group libvirt      >/dev/null || groupadd -r libvirt
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
CONF=/etc/libvirt/qemu.conf
touch "$CONF"
if ! grep -q '^# virtgate test setup' "$CONF"; then
  sed -i -E '/^[[:space:]]*(user|group|security_driver|cgroup_controllers)[[:space:]]*=/d' "$CONF"
  printf '# virtgate test setup\nuser = "root"\ngroup = "root"\nsecurity_driver = "none"\ncgroup_controllers = [ ]\n' >> "$CONF"
fi
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/lib/libvirt/dnsmasq /run/libvirt /etc/libvirt/hooks
[ -c /dev/net/tun ] || { mkdir -p /dev/net; mknod /dev/net/tun c 10 200; chmod 666 /dev/net/tun; }
if [ ! -e /etc/libvirt/qemu/networks/default.xml ]; then
  mkdir -p /etc/libvirt/qemu/networks
  cp /usr/share/libvirt/networks/default.xml /etc/libvirt/qemu/networks/default.xml
fi
