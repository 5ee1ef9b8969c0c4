#!/usr/bin/env bash
# Two network namespaces joined by a veth pair, for cluster tests and benchmarks that should
# cross a real (virtual) link instead of loopback. Needs root and iproute2.
#
#   tools/netns.sh up PREFIX [OCTET]   creates namespaces PREFIX"a" and PREFIX"b", a veth pair
#                                      "fpa" (in a) <-> "fpb" (in b) with 10.231.OCTET.1/24 and
#                                      10.231.OCTET.2/24, lo and both ends up; prints
#                                      "a NS ADDR" and "b NS ADDR" lines
#   tools/netns.sh down PREFIX         deletes both namespaces (and with them the veth pair)
#
# OCTET defaults to a value derived from PREFIX (cksum mod 254, plus 1). The addresses exist
# only inside the two namespaces, so nothing leaves the machine and the root namespace's
# routes are untouched. Run a command in one side with `ip netns exec PREFIXa CMD...`; Unix
# sockets and files stay shared, so a process in the root namespace reaches both sides'
# Unix sockets. `ferroplasma-bench transfer --netns on` runs the same commands itself.
set -euo pipefail

usage() {
  echo "usage: $0 up PREFIX [OCTET] | down PREFIX" >&2
  exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
prefix=$2
ns_a="${prefix}a"
ns_b="${prefix}b"

case "$cmd" in
  up)
    if [ $# -ge 3 ]; then
      octet=$3
    else
      octet=$(( $(printf '%s' "$prefix" | cksum | cut -d' ' -f1) % 254 + 1 ))
    fi
    [ "$octet" -ge 1 ] && [ "$octet" -le 254 ] || { echo "OCTET must be 1..254" >&2; exit 2; }
    # On failure remove only what this call created, never a namespace that already existed.
    ip netns add "$ns_a"
    trap 'ip netns del "$ns_a" 2>/dev/null || true' ERR
    ip netns add "$ns_b"
    trap 'ip netns del "$ns_a" 2>/dev/null || true; ip netns del "$ns_b" 2>/dev/null || true' ERR
    ip link add fpa netns "$ns_a" type veth peer name fpb netns "$ns_b"
    ip -n "$ns_a" addr add "10.231.$octet.1/24" dev fpa
    ip -n "$ns_b" addr add "10.231.$octet.2/24" dev fpb
    for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
    ip -n "$ns_a" link set fpa up
    ip -n "$ns_b" link set fpb up
    trap - ERR
    echo "a $ns_a 10.231.$octet.1"
    echo "b $ns_b 10.231.$octet.2"
    ;;
  down)
    status=0
    for ns in "$ns_a" "$ns_b"; do
      if ip netns list | awk '{print $1}' | grep -qxF -- "$ns"; then
        ip netns del "$ns" || status=1
      fi
    done
    exit $status
    ;;
  *)
    usage
    ;;
esac
