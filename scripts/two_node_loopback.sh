#!/usr/bin/env bash
# Two torchrun "nodes" on this one machine, over the loopback interface: the multi-node recipe of
# docs/scaling.md (one torchrun agent per node, c10d rendezvous) tried without a cluster.
#
#   scripts/two_node_loopback.sh --config configs/multiclass.yaml --output runs/two-node
#
# The arguments go to `textclass train`. Each node runs NPROC_PER_NODE processes (default 1), with
# OMP_NUM_THREADS=1 unless set, and its own tokenization cache, $TEXTCLASS_CACHE/node0 and node1 (two
# machines would not share one; TEXTCLASS_CACHE defaults to ~/.cache/textclass). PYTHON (default: python)
# is the interpreter that has textclass installed. Exits with the first failing node's code, 0 if both succeed.
set -euo pipefail

python=${PYTHON:-python}
cache=${TEXTCLASS_CACHE:-$HOME/.cache/textclass}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

pids=()
# A node that fails leaves the other one waiting for it in a collective: stop both on the way out.
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for node in 0 1; do
  TEXTCLASS_CACHE="$cache/node$node" "$python" -m torch.distributed.run \
    --nnodes 2 --nproc-per-node "${NPROC_PER_NODE:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" --rdzv-id "loopback-$port" --local-addr 127.0.0.1 \
    -m textclass train "$@" &
  pids+=("$!")
done
for _ in "${pids[@]}"; do
  wait -n || exit $?
done
