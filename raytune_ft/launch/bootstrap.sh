#!/usr/bin/env bash
# raytune_ft bootstrap: turn N containers into one Ray cluster and run the job on rank 0.
#
#   rank 0   starts the Ray head, waits until all N nodes have joined, runs the job command
#            (default: python -m raytune_ft.launch.driver SPEC), tells the others it is done,
#            stops Ray and exits with the job's exit code.
#   rank > 0 joins the head (retrying until it is up) and stays until rank 0 reports the job done
#            (or the head has been gone for RTF_HEAD_LOST_TIMEOUT seconds), then stops Ray.
#
# Where the topology comes from (first one set wins):
#   node rank     RTF_NODE_RANK    NODE_RANK (RunPod Instant Clusters)        default 0
#   node count    RTF_NUM_NODES    NUM_NODES (RunPod)                         default 1
#   head address  RTF_HEAD_ADDRESS PRIMARY_ADDR, MASTER_ADDR (RunPod)         rank 0: this node
#   this node IP  RTF_NODE_IP      NODE_ADDR (RunPod)                         Ray's own guess
#   Ray GCS port  RTF_RAY_PORT                                                default 6379
# RunPod's PRIMARY_PORT/MASTER_PORT is left to torch.distributed; Ray uses its own port.
#
# Ray token authentication (Ray >= 2.52): give every node the same RAY_AUTH_TOKEN (or
# RAY_AUTH_TOKEN_PATH); RAY_AUTH_MODE=token is then set for you. Without a token the script
# refuses to start unless RTF_ALLOW_NO_AUTH=1 (an open Ray port runs anyone's code). The token is
# never printed: nothing here echoes the environment, and there is no `set -x`.
#
# Other settings:
#   RTF_SPEC / RTF_SPEC_B64     the job spec file (default /etc/rtf/spec.yaml) or its base64 text
#   RTF_REQUIRED_ENV            names that must be set and resolved before anything starts
#   RTF_NUM_CPUS RTF_NUM_GPUS   Ray node resources (default: detected)
#   RTF_RAY_RESOURCES           custom resources as JSON, e.g. {"accelerator_type:H100": 1}
#   RTF_RAY_TEMP_DIR            Ray's --temp-dir
#   RTF_RAY_START_ARGS          extra `ray start` arguments (split on whitespace)
#   RTF_DASHBOARD_HOST/_PORT    head dashboard bind (default 127.0.0.1:8265; tunnel to reach it)
#   RTF_JOIN_TIMEOUT            seconds for the cluster to form (default 900)
#   RTF_POLL_INTERVAL           seconds between checks (default 5)
#   RTF_HEAD_LOST_TIMEOUT       seconds a worker waits for a vanished head (default 120)
#   RTF_LEAVE_TIMEOUT           seconds rank 0 waits for the others to leave (default 60)
#   RTF_TERM_GRACE              on SIGTERM/SIGINT, seconds rank 0 gives the job (sent the same signal)
#                               to stop before Ray is stopped; on ranks > 0, the deadline of the drain
#                               (reason preemption) that lets a training run checkpoint and move off
#                               this node before Ray is stopped (default 90; keep it under the platform's
#                               stop grace period, less RTF_STOP_TIMEOUT)
#   RTF_WORKDIR                 working directory for the job (default: the current one; when it
#                               is not writable, $HOME/rtf-work with a warning)
#   RTF_PYTHON                  the Python with Ray installed (default: python)
# Arguments, if any, replace the default job command.
#
# Exit codes: rank 0 returns the job's; 2 = bad configuration; 3 = the cluster did not form;
# 1 = Ray failed. Ranks > 0 return 0 after a reported finish, 1 otherwise.

set -uo pipefail

PY=${RTF_PYTHON:-python}
RANK=${RTF_NODE_RANK:-${NODE_RANK:-0}}
NUM_NODES=${RTF_NUM_NODES:-${NUM_NODES:-1}}
HEAD=${RTF_HEAD_ADDRESS:-${PRIMARY_ADDR:-${MASTER_ADDR:-}}}
NODE_IP=${RTF_NODE_IP:-${NODE_ADDR:-}}
PORT=${RTF_RAY_PORT:-6379}
JOIN_TIMEOUT=${RTF_JOIN_TIMEOUT:-900}
POLL=${RTF_POLL_INTERVAL:-5}
HEAD_LOST_TIMEOUT=${RTF_HEAD_LOST_TIMEOUT:-120}
LEAVE_TIMEOUT=${RTF_LEAVE_TIMEOUT:-60}
STOP_TIMEOUT=${RTF_STOP_TIMEOUT:-30}
TERM_GRACE=${RTF_TERM_GRACE:-90}
RAY_PID=""
JOB_PID=""

log() { printf '[rtf-bootstrap rank %s] %s\n' "$RANK" "$*" >&2; }
die() {
  local code=$1
  shift
  log "ERROR: $*"
  exit "$code"
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

for v in RANK NUM_NODES PORT JOIN_TIMEOUT POLL HEAD_LOST_TIMEOUT LEAVE_TIMEOUT STOP_TIMEOUT TERM_GRACE; do
  is_uint "${!v}" || die 2 "$v must be a non-negative integer (got '${!v}')"
done
((NUM_NODES >= 1)) || die 2 "the node count must be at least 1"
((RANK < NUM_NODES)) || die 2 "node rank $RANK is out of range for $NUM_NODES node(s)"
if [[ -z $HEAD ]]; then
  ((RANK == 0)) || die 2 "no head address: set RTF_HEAD_ADDRESS (RunPod Instant Clusters set PRIMARY_ADDR)"
  HEAD=${NODE_IP:-127.0.0.1}
fi
ADDR="$HEAD:$PORT"

# --------------------------------------------------------------------------- secrets and auth

unresolved() { [[ $1 == *'{{'*'}}'* ]]; }

for name in ${RTF_REQUIRED_ENV:-}; do
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die 2 "RTF_REQUIRED_ENV: '$name' is not a variable name"
  [[ -n ${!name:-} ]] || die 2 "$name is not set; the job needs it (create the secret it references)"
  unresolved "${!name}" && die 2 "$name holds a secret reference that was not resolved; create that secret on the platform"
done

if [[ -n ${RAY_AUTH_TOKEN:-} || -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
  [[ -n ${RAY_AUTH_TOKEN:-} ]] && unresolved "$RAY_AUTH_TOKEN" &&
    die 2 "RAY_AUTH_TOKEN holds a secret reference that was not resolved; create that secret on the platform"
  [[ -z ${RAY_AUTH_TOKEN:-} && ! -s $RAY_AUTH_TOKEN_PATH ]] && die 2 "RAY_AUTH_TOKEN_PATH names a missing or empty file"
  if [[ ${RAY_AUTH_MODE:-token} != token ]]; then
    log "WARNING: RAY_AUTH_MODE=${RAY_AUTH_MODE} although a token is given: Ray token authentication is OFF"
  fi
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
elif [[ ${RTF_ALLOW_NO_AUTH:-0} == 1 ]]; then
  log "WARNING: RTF_ALLOW_NO_AUTH=1: starting Ray without token authentication; anyone reaching port $PORT can run code"
  export RAY_AUTH_MODE=disabled
else
  die 2 "no Ray auth token: give every node the same RAY_AUTH_TOKEN (e.g. a platform secret) or RAY_AUTH_TOKEN_PATH; RTF_ALLOW_NO_AUTH=1 runs without (unsafe)"
fi
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# Training nodes have no traffic to drain; Ray's default waits 30 s on every stop.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

if [[ -n ${RTF_WORKDIR:-} ]]; then
  mkdir -p "$RTF_WORKDIR" 2>/dev/null
  if [[ ! -w $RTF_WORKDIR ]]; then
    # e.g. a root-owned platform volume while the image runs as an unprivileged user
    fallback="${HOME:-/tmp}/rtf-work"
    log "WARNING: RTF_WORKDIR $RTF_WORKDIR is not writable by uid $(id -u); using $fallback on the container disk"
    [[ ${HF_HOME:-} == "$RTF_WORKDIR"* ]] && export HF_HOME="$fallback/.cache/huggingface"
    RTF_WORKDIR=$fallback
    mkdir -p "$RTF_WORKDIR"
  fi
  cd "$RTF_WORKDIR" || die 2 "cannot use RTF_WORKDIR $RTF_WORKDIR"
fi

# --------------------------------------------------------------------------- talking to the GCS

# One small Python helper, no driver: alive-node count and a completion marker in the GCS KV store.
GCS_PY='
import sys
from ray._raylet import GcsClient
op, addr = sys.argv[1], sys.argv[2]
try:
    c = GcsClient(address=addr)
except Exception as e:
    sys.exit(77 if type(e).__name__ == "AuthenticationError" else 1)
if op == "alive":
    print(sum(1 for n in c.get_all_node_info(timeout=10).values() if n.state == 0))
elif op == "put-done":
    c.internal_kv_put(b"done", sys.argv[3].encode(), True, b"rtf-bootstrap", timeout=10)
elif op == "get-done":
    v = c.internal_kv_get(b"done", b"rtf-bootstrap", timeout=10)
    print("" if v is None else v.decode())
'
tcp_open() { (exec 3<>"/dev/tcp/$HEAD/$PORT") 2>/dev/null; }
gcs() { tcp_open && timeout 30 "$PY" -c "$GCS_PY" "$1" "$ADDR" "${@:2}" 2>/dev/null; }
TOKEN_REJECTED=77  # gcs() status when the head refuses this node's token

# --------------------------------------------------------------------------- Ray processes

start_ray() {
  local args=(--block --disable-usage-stats)
  [[ -n $NODE_IP ]] && args+=(--node-ip-address "$NODE_IP")
  [[ -n ${RTF_RAY_TEMP_DIR:-} ]] && args+=(--temp-dir "$RTF_RAY_TEMP_DIR")
  [[ -n ${RTF_NUM_CPUS:-} ]] && args+=(--num-cpus "$RTF_NUM_CPUS")
  [[ -n ${RTF_NUM_GPUS:-} ]] && args+=(--num-gpus "$RTF_NUM_GPUS")
  [[ -n ${RTF_RAY_RESOURCES:-} ]] && args+=(--resources "$RTF_RAY_RESOURCES")
  local extra=()
  read -r -a extra <<<"${RTF_RAY_START_ARGS:-}"
  if ((RANK == 0)); then
    ray start --head --port "$PORT" \
      --dashboard-host "${RTF_DASHBOARD_HOST:-127.0.0.1}" --dashboard-port "${RTF_DASHBOARD_PORT:-8265}" \
      "${args[@]}" "${extra[@]}" &
  else
    ray start --address "$ADDR" "${args[@]}" "${extra[@]}" &
  fi
  RAY_PID=$!
}

stop_ray() {
  [[ -n $RAY_PID ]] && kill -0 "$RAY_PID" 2>/dev/null || return 0
  log "stopping Ray on this node"
  kill -TERM "$RAY_PID" 2>/dev/null
  local waited=0
  while kill -0 "$RAY_PID" 2>/dev/null && ((waited < STOP_TIMEOUT)); do
    sleep 1
    waited=$((waited + 1))
  done
  kill -0 "$RAY_PID" 2>/dev/null && kill -KILL "$RAY_PID" 2>/dev/null
  wait "$RAY_PID" 2>/dev/null
  RAY_PID=""
}

# A worker node's stop (rank > 0): drain it as preempted, with the grace period as the deadline, and keep Ray up
# until then. A training run on it gets Ray Train's preemption notice, commits a just-in-time checkpoint if one
# fits, and restarts on the nodes left (or a replacement) when the deadline passes; without the drain Ray sees a
# node vanish, and the run restarts from its last periodic checkpoint, counted as a failure.
drain_self() {
  local args=(--deadline "$TERM_GRACE" --address "$ADDR" --message "pod stop (SIGTERM to the rtf bootstrap)")
  [[ -n ${RTF_RAY_TEMP_DIR:-} ]] && args+=(--temp-dir "$RTF_RAY_TEMP_DIR")
  [[ -n $NODE_IP ]] && args+=(--node-ip "$NODE_IP")
  log "draining this node (reason preemption, deadline ${TERM_GRACE}s) before Ray stops"
  "$PY" -m raytune_ft.launch.drain "${args[@]}" --no-wait || {
    log "WARNING: the drain failed (above); stopping Ray now"
    return
  }
  local waited=0
  while kill -0 "$RAY_PID" 2>/dev/null && ((waited < TERM_GRACE)); do
    sleep 1
    waited=$((waited + 1))
  done
}

on_signal() {
  log "received $1; shutting down"
  if ((RANK > 0)) && [[ -n $RAY_PID ]] && kill -0 "$RAY_PID" 2>/dev/null && ((TERM_GRACE > 0)); then
    drain_self
  elif [[ -n $JOB_PID ]] && kill -0 "$JOB_PID" 2>/dev/null; then
    # A pod stop or eviction: the job gets the signal and up to RTF_TERM_GRACE seconds, with Ray still
    # up, to record its stop (and checkpoint) before Ray goes.
    kill -TERM "$JOB_PID" 2>/dev/null
    log "waiting up to ${TERM_GRACE}s for the job to stop"
    local waited=0
    while kill -0 "$JOB_PID" 2>/dev/null && ((waited < TERM_GRACE)); do
      sleep 1
      waited=$((waited + 1))
    done
  fi
  exit 143
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'stop_ray' EXIT

# --------------------------------------------------------------------------- rank 0

run_head() {
  local job=("$@")
  if ((${#job[@]} == 0)); then
    local spec=${RTF_SPEC:-/etc/rtf/spec.yaml}
    if [[ -n ${RTF_SPEC_B64:-} ]]; then
      spec="${RTF_WORKDIR:-${TMPDIR:-/tmp}}/rtf-spec.yaml"
      printf '%s' "$RTF_SPEC_B64" | base64 -d >"$spec" || die 2 "RTF_SPEC_B64 is not valid base64"
    fi
    [[ -s $spec ]] || die 2 "job spec not found at $spec (set RTF_SPEC or RTF_SPEC_B64, or pass a command)"
    job=("$PY" -m raytune_ft.launch.driver "$spec")
  fi

  log "starting the Ray head on port $PORT; waiting for $NUM_NODES node(s)"
  start_ray
  local start=$SECONDS n=0 said=-1
  while :; do
    kill -0 "$RAY_PID" 2>/dev/null || {
      wait "$RAY_PID"
      die 1 "the Ray head exited (code $?) before the cluster formed; see the output above"
    }
    n=$(gcs alive) || n=0
    [[ $n =~ ^[0-9]+$ ]] || n=0
    ((n >= NUM_NODES)) && break
    if ((SECONDS - start >= JOIN_TIMEOUT)); then
      gcs put-done 3 >/dev/null
      die 3 "only $n of $NUM_NODES node(s) joined within ${JOIN_TIMEOUT}s. Check that every node runs this script with the same RAY_AUTH_TOKEN, RTF_NUM_NODES/NUM_NODES, and can reach $ADDR"
    fi
    if ((n != said)); then
      log "$n of $NUM_NODES node(s) up"
      said=$n
    fi
    sleep "$POLL"
  done
  log "cluster formed: $n node(s) after $((SECONDS - start))s; running the job"

  export RAY_ADDRESS="$ADDR"
  "${job[@]}" &
  JOB_PID=$!
  local rc=0
  wait "$JOB_PID" || rc=$?
  JOB_PID=""
  log "job finished with exit code $rc; telling the other nodes"
  gcs put-done "$rc" >/dev/null || log "WARNING: could not record completion in the GCS"
  start=$SECONDS
  while ((NUM_NODES > 1 && SECONDS - start < LEAVE_TIMEOUT)); do
    n=$(gcs alive) || break
    [[ $n =~ ^[0-9]+$ ]] && ((n <= 1)) && break
    sleep 1
  done
  stop_ray
  exit "$rc"
}

# --------------------------------------------------------------------------- ranks > 0

run_worker() {
  local start=$SECONDS lost_since="" done_rc said=0
  log "joining the head at $ADDR"
  while :; do
    if [[ -z $RAY_PID ]]; then
      gcs alive >/dev/null
      local probe=$?
      if ((probe == 0)); then
        start_ray
      elif ((probe == TOKEN_REJECTED)); then
        die 2 "the head at $ADDR rejected this node's Ray auth token: every node needs the same RAY_AUTH_TOKEN"
      elif ((SECONDS - start >= JOIN_TIMEOUT)); then
        die 3 "the Ray head at $ADDR was not reachable within ${JOIN_TIMEOUT}s (check the address, port and token)"
      elif ((said == 0)); then
        log "waiting for the head at $ADDR"
        said=1
      fi
    elif ! kill -0 "$RAY_PID" 2>/dev/null; then
      wait "$RAY_PID"
      local code=$?
      RAY_PID=""
      done_rc=$(gcs get-done) || done_rc=""
      if [[ -n $done_rc ]]; then
        log "Ray on this node stopped after the job finished (exit $done_rc)"
        exit 0
      fi
      ((SECONDS - start < JOIN_TIMEOUT)) || die 1 "Ray on this node exited (code $code) and the head reports no finish"
      log "ray start exited (code $code); retrying"
    fi
    sleep "$POLL"
    [[ -n $RAY_PID ]] || continue
    if done_rc=$(gcs get-done); then
      lost_since=""
      if [[ -n $done_rc ]]; then
        log "the head reports the job finished (exit $done_rc); leaving"
        stop_ray
        exit 0
      fi
    elif [[ -z $lost_since ]]; then
      lost_since=$SECONDS
    elif ((SECONDS - lost_since >= HEAD_LOST_TIMEOUT)); then
      log "the head at $ADDR has been unreachable for ${HEAD_LOST_TIMEOUT}s and reported no finish; leaving"
      stop_ray
      exit 1
    fi
  done
}

if ((RANK == 0)); then
  run_head "$@"
else
  run_worker
fi
