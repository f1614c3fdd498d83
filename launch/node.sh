#!/bin/bash
# One node of a multi-node run without ssh between nodes (Kubernetes, SLURM sites without pdsh/ssh, cloud VMs):
# every node runs this script once, with the same hostfile and its own NODE_RANK; it checks its inputs and runs
# DeepSpeed's own per-node launcher, `deepspeed --no_ssh --node_rank NODE_RANK`, which starts this node's ranks
# (the hostfile's slots) and joins them to the rendezvous at MASTER_ADDR:MASTER_PORT.
#
#   NODE_RANK=1 MASTER_ADDR=10.0.0.5 MPMA_HOSTFILE=/shared/hostfile launch/node.sh launch/pretrain.py \
#       --config launch/configs/pretrain_base.yaml --resume auto
#
# Environment:
#   MPMA_HOSTFILE   DeepSpeed hostfile, one "<host> slots=<ranks>" line per node, the same on every node
#   NODE_RANK       this node's line in the hostfile, 0-based (SLURM: SLURM_NODEID; a Kubernetes indexed Job:
#                   JOB_COMPLETION_INDEX; a StatefulSet: the pod ordinal)
#   MASTER_ADDR     address of node 0, reachable from every node (loopback for nodes on one machine)
#   MASTER_PORT     rendezvous port on node 0 (default 29500)
#   MPMA_NODE_DRY_RUN=1  check and print the command, do not launch
set -euo pipefail

die() { echo "node.sh: error: $*" >&2; exit 2; }

HOSTFILE="${MPMA_HOSTFILE:-}"
[[ -n "$HOSTFILE" ]] || die "MPMA_HOSTFILE is not set; point it at the hostfile every node shares"
[[ -f "$HOSTFILE" ]] || die "hostfile $HOSTFILE does not exist; every node needs the same hostfile"
[[ $# -gt 0 ]] || die "no training script; pass launch/pretrain.py and its arguments"
# DeepSpeed's fetch_hostfile reads the same lines: "<host> slots=<n>", '#' comments and blank lines ignored
mapfile -t HOSTS < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HOSTFILE")
NNODES=${#HOSTS[@]}
[[ $NNODES -gt 0 ]] || die "hostfile $HOSTFILE names no host; write one '<host> slots=<ranks>' line per node"
NODE_RANK="${NODE_RANK:-}"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be this node's 0-based line in $HOSTFILE, got '${NODE_RANK}'"
((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK is out of range: $HOSTFILE names $NNODES node(s), so NODE_RANK is 0..$((NNODES - 1))"
[[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR is not set; give the address of node 0 (the first line of $HOSTFILE)"
MASTER_PORT="${MASTER_PORT:-29500}"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

CMD=(deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR"
     --master_port "$MASTER_PORT" "$@")
echo "node $NODE_RANK of $NNODES (${HOSTS[$NODE_RANK]%% *})  master: $MASTER_ADDR:$MASTER_PORT  command: ${CMD[*]}"
if [[ "${MPMA_NODE_DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi
exec "${CMD[@]}"
