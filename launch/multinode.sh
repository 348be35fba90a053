#!/bin/bash
# Train on SLURM nodes; survive preemption and time limits by checkpointing and requeueing.
#
#     sbatch launch/multinode.sh CONFIG.yaml [key.sub=value ...]
#     sbatch --nodes=4 --gpus-per-node=4 --time=2-00:00:00 launch/multinode.sh configs/cifar10.yaml run_dir=runs/c10
#
# One srun task per node runs `accelerate launch`, which starts one training process per GPU.
# SLURM sends USR1 to this shell 300 s before the time limit; it relays it to the training
# processes, which stop at a step every rank agrees on, save a checkpoint and exit 75; this shell
# then requeues the job, and the next run resumes from that checkpoint. A run that finished its
# steps exits 0 and is not requeued. Environment variables, logs and troubleshooting: SLURM.md.
#
# Defaults below are for 8-GPU nodes; sbatch command-line options override them.
#SBATCH --job-name=ddpm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out

set -u -o pipefail

EXIT_PREEMPTED=75  # pipeline/preempt.py: stopped on a signal, with a complete checkpoint
ME=multinode.sh

die() { echo "$ME: error: $*" >&2; exit 2; }
say() { echo "$ME: $*"; }

# -- checks: fail here, in one line, not on the nodes ------------------------------------------------
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job; submit it: sbatch launch/multinode.sh CONFIG.yaml [key.sub=value ...]"
[ $# -ge 1 ] || die "give a config file: sbatch launch/multinode.sh CONFIG.yaml [key.sub=value ...]"
[ -f "$1" ] || die "config file '$1' not found (relative paths start at the submit directory, $PWD)"
command -v srun >/dev/null 2>&1 || die "srun not found on PATH in the job environment"

# -- what differs between clusters: environment overrides (SLURM.md lists them) ---------------------
PYTHON=${DDPM_PYTHON:-python3}
# find_spec, not import: importing torch here would cost seconds on every start.
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('accelerate') and u.find_spec('pipeline')))" 2>/dev/null ||
    die "'$PYTHON' cannot import accelerate and pipeline; set DDPM_PYTHON to the python of the project's venv"
STOP_SIGNAL=${STOP_SIGNAL:-USR1}  # must match `#SBATCH --signal=B:<this>@...`
STOP_SIGNAL=${STOP_SIGNAL#SIG}
NUM_MACHINES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?}}
if [ "${DDPM_CPU:-0}" = 1 ]; then
    # CPU processes over gloo; accelerate's --cpu would run only one process (../shared notes).
    export ACCELERATE_USE_CPU=true
    PROCS_PER_NODE=${GPUS_PER_NODE:-1} mode=" (CPU mode)"
else
    mode=""
    gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
    PROCS_PER_NODE=${gpus##*:}  # SLURM_GPUS_PER_NODE may read "a100:8"
    [ -n "$PROCS_PER_NODE" ] && [ "$PROCS_PER_NODE" -gt 0 ] 2>/dev/null ||
        die "no GPUs allocated (request --gpus-per-node, set GPUS_PER_NODE, or DDPM_CPU=1 for CPU processes)"
fi
NUM_PROCESSES=$((NUM_MACHINES * PROCS_PER_NODE))

first_host() {  # the first node of the allocation: rank 0 runs there and listens for the others
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p
    else
        # No scontrol in the job (e.g. a container): take the first value of each [..] range,
        # then the first host: "gpu[003-010,12],cpu1" -> gpu003, "10.0.0.[1-2]" -> 10.0.0.1.
        echo "$SLURM_JOB_NODELIST" | sed -E 's/\[([^],-]*)[^]]*\]/\1/g' | cut -d, -f1
    fi
}
export MASTER_ADDR=${MASTER_ADDR:-$(first_host)}
# Derived from the job id so that two jobs sharing a node do not collide; kept across requeues.
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
[ -n "$MASTER_ADDR" ] || die "could not find the first host of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'; set MASTER_ADDR"

launch_flags=(--multi_gpu --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES"
              --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
              --rdzv_backend static --same_network --max_restarts 0
              # The config's train.mixed_precision and train.compile decide; these only quiet warnings.
              --mixed_precision no --dynamo_backend no)
# Extra `accelerate launch` flags, e.g. ACCELERATE_ARGS="--use_deepspeed --zero_stage 2".
read -r -a extra_flags <<< "${ACCELERATE_ARGS:-}"
train_args=("$@" "train.stop_signal=SIG$STOP_SIGNAL")

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NUM_MACHINES node(s) [$SLURM_JOB_NODELIST]:" \
    "$PROCS_PER_NODE process(es) per node, $NUM_PROCESSES in all$mode;" \
    "rank 0 at $MASTER_ADDR:$MASTER_PORT; NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-(auto)}"

# -- one task per node ---------------------------------------------------------------------------------
# Runs under srun on every node (a function, so the script needs no file on the nodes: SLURM runs
# a copy of this script that exists only on the first node).
run_node() {
    local stop="" launcher rc
    # The launcher ignores the stop signal (started so below): SIGUSR1 would kill it. The training
    # processes catch it; SLURM delivers it to the whole task tree, and this relays it as well for
    # process trackers that signal only the task's own process.
    trap 'stop=$STOP_SIGNAL; pkill -"$STOP_SIGNAL" -P "$launcher" 2>/dev/null' "$STOP_SIGNAL"
    trap 'stop=TERM' TERM  # the launcher passes SIGTERM on to the training processes itself
    (trap '' "$STOP_SIGNAL"; exec "$PYTHON" -m accelerate.commands.launch "${launch_flags[@]}" \
        --machine_rank "$SLURM_NODEID" "${extra_flags[@]}" -m pipeline.train "${train_args[@]}") &
    launcher=$!
    wait_for "$launcher"; rc=$?
    # The launcher reports any non-zero worker status as 1; the stop request tells which it was.
    if [ "$rc" -ne 0 ] && { [ "$rc" -eq "$EXIT_PREEMPTED" ] || [ -n "$stop" ]; }; then
        echo "node $SLURM_NODEID: training stopped on SIG$stop with a checkpoint (exit $EXIT_PREEMPTED)"
        return "$EXIT_PREEMPTED"
    fi
    return "$rc"
}

wait_for() {  # the exit status of background job $1; `wait` returns early when a trapped signal arrives
    while kill -0 "$1" 2>/dev/null; do wait "$1"; done
    wait "$1"
}

# -- the batch shell: relay the pre-timeout signal, then requeue if training stopped early -------------
stop="" terminating="" srun_pid=""
on_stop() {
    stop=$STOP_SIGNAL
    say "got SIG$STOP_SIGNAL (time limit near or preemption): asking training to checkpoint and stop"
    # srun forwards it to every task (and so to every training process).
    [ -n "$srun_pid" ] && kill -"$STOP_SIGNAL" "$srun_pid" 2>/dev/null
}
trap on_stop "$STOP_SIGNAL"
# SIGTERM here means SLURM is ending the job (cancel, time limit, preemption); it signals the tasks
# itself, and the training processes save if they can within KillWait. Keep waiting for them.
trap 'terminating=1; say "got SIGTERM: SLURM is ending the job"' TERM

# The task's shell gets this script's settings and functions as text: nothing to find on the nodes.
node_script="$(declare -p PYTHON STOP_SIGNAL EXIT_PREEMPTED launch_flags extra_flags train_args)
$(declare -f run_node wait_for)
run_node"
# srun does not inherit sbatch's --cpus-per-task since Slurm 22.05: pass it on, or the task gets one CPU.
srun --nodes="$NUM_MACHINES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    --kill-on-bad-exit=0 --wait=120 --label bash -c "$node_script" &
srun_pid=$!
wait_for "$srun_pid"; rc=$?

if [ "$rc" -eq 0 ]; then
    say "training finished"
    exit 0
fi
if [ -n "$terminating" ]; then
    # Cancelled, out of time or preempted: SLURM decides (it requeues itself under PreemptMode=REQUEUE).
    say "SLURM ended the job; training exited with status $rc (75: with a checkpoint); not requeueing"
    exit "$rc"
fi
if [ "$rc" -ne "$EXIT_PREEMPTED" ] && [ -z "$stop" ]; then
    say "training failed with status $rc; not requeueing"
    exit "$rc"
fi
if command -v scontrol >/dev/null 2>&1 && scontrol requeue "$SLURM_JOB_ID"; then
    say "requeued job $SLURM_JOB_ID; its next run resumes from the checkpoint just saved"
    exit 0
fi
# No scontrol here: SLURM requeues the job itself where slurm.conf has RequeueExit=75.
say "could not requeue with scontrol; exiting $EXIT_PREEMPTED (requeued by SLURM where RequeueExit=$EXIT_PREEMPTED," \
    "otherwise submit the same command again to resume)"
exit "$EXIT_PREEMPTED"
