#!/usr/bin/env bash
# Prepares what the ipvs VM tests boot (../../docs/ipvs.md, "The VM test bed"): Debian's generic
# 6.1 kernel (IP_VS, ip_set and 9p as modules, unlike the machines' own kernel) unpacked under
# $KP_VM_DIR, its uncompressed vmlinux (qemu boots it through the PVH entry, skipping the slow
# in-guest decompression under TCG), and a busybox initramfs whose init mounts the host's root
# read-only over 9p and runs a command there (scripts/vm/init). Idempotent: a second run only
# rebuilds the initramfs. Needs root for apt-get when packages are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${KP_VM_DIR:-/var/cache/kube-proxy-rs/vm}
mkdir -p "$dir"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v ipvsadm >/dev/null || need+=(ipvsadm)
command -v ipset >/dev/null || need+=(ipset)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
command -v lz4 >/dev/null || need+=(lz4)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The kernel package the metapackage points at today (one exact version, not a wildcard).
if [ ! -f "$dir/kernel.version" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "prepare.sh: cannot tell which linux-image package to fetch" >&2; exit 1; }
  rm -rf "$dir/kernel" "$dir"/*.deb
  (cd "$dir" && apt-get download -qq "$pkg")
  dpkg-deb -x "$dir"/"$pkg"_*.deb "$dir/kernel"
  rm -f "$dir"/*.deb
  version=${pkg#linux-image-}
  depmod -b "$dir/kernel" "$version"
  # vmlinuz -> vmlinux: find the compressed payload by its magic and decompress it.
  image="$dir/kernel/boot/vmlinuz-$version"
  python3 - "$image" "$dir/vmlinux" <<'PY'
import lzma, subprocess, sys, zlib
data = open(sys.argv[1], "rb").read()
out = sys.argv[2]
def elf(blob):
    return blob[:4] == b"\x7fELF"
tries = [
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
    (b"\x28\xb5\x2f\xfd", lambda b: subprocess.run(["zstd", "-dc"], input=b, capture_output=True).stdout),
    (b"\x02\x21\x4c\x18", lambda b: subprocess.run(["lz4", "-dc"], input=b, capture_output=True).stdout),
    (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(31).decompress(b)),
]
for magic, unpack in tries:
    at = data.find(magic)
    while at >= 0:
        try:
            blob = unpack(data[at:])
        except Exception:
            blob = b""
        if elf(blob):
            open(out, "wb").write(blob)
            sys.exit(0)
        at = data.find(magic, at + 1)
sys.exit("no ELF kernel found in " + sys.argv[1])
PY
  echo "$version" > "$dir/kernel.version"
fi
version=$(cat "$dir/kernel.version")

# The initramfs: busybox, the init script, and a link to the unpacked modules (reached over
# 9p once the host's root is mounted).
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,host,tmp,lib}
cp /bin/busybox "$root/bin/busybox"
for applet in sh mount umount mkdir ln cat echo insmod modprobe poweroff chroot sleep sysctl grep sed seq uname; do
  ln -s busybox "$root/bin/$applet"
done
ln -s ../bin/busybox "$root/sbin/modprobe"
ln -s "/host$dir/kernel/lib/modules" "$root/lib/modules"
cp "$here/init" "$root/init"
# The modules needed to reach the host's root (9p over virtio), decompressed, in load order.
modules="$dir/kernel/lib/modules/$version"
mkdir -p "$root/boot-modules"
modprobe -d "$dir/kernel" -S "$version" --show-depends -a virtio_pci 9pnet_virtio 9p \
  | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++' > "$root/boot-modules/order.host"
: > "$root/boot-modules/order"
while read -r ko; do
  name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
  case "$ko" in
    *.xz) xz -dc "$ko" > "$root/boot-modules/$name" ;;
    *.zst) zstd -qdc "$ko" > "$root/boot-modules/$name" ;;
    *) cp "$ko" "$root/boot-modules/$name" ;;
  esac
  echo "$name" >> "$root/boot-modules/order"
done < "$root/boot-modules/order.host"
rm "$root/boot-modules/order.host"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$dir/initramfs.gz.tmp"
mv "$dir/initramfs.gz.tmp" "$dir/initramfs.gz"
echo "VM kernel $version ready in $dir"
