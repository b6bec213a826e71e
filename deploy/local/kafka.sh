#!/usr/bin/env bash
# Local Apache Kafka (KRaft), run straight from Maven Central jars so that developers and CI need only Java 17+
# and Maven — no tarball download, no Docker. One node by default (broker and controller in one JVM); with
# `--brokers 3` a three-node cluster on loopback (each node broker + controller; replication factor 3,
# min.insync.replicas 2), for tests that kill a broker.
#
#   deploy/local/kafka.sh start [--brokers N] | stop [--force] | status
#
# Ownership: `stop` stops only brokers that `start` launched from this home with the same owner token
# (TRAINWATCH_KAFKA_OWNER, default "user"); `start` leaves a broker it finds already running alone (whoever started
# it), and records no ownership for it, so a later `stop` under another owner (e.g. CI's trap) does nothing.
#
# Env: TRAINWATCH_KAFKA_HOME (state, default ~/.cache/trainwatch/kafka), TRAINWATCH_KAFKA_LIBS (jar cache, default
#      $TRAINWATCH_KAFKA_HOME/libs), TRAINWATCH_KAFKA_PORT (9092), TRAINWATCH_KAFKA_CONTROLLER_PORT (9093),
#      TRAINWATCH_KAFKA_OWNER (user), PYTHON (interpreter with confluent_kafka for the readiness check; default:
#      the repo's .venv, else python3). Node i of a cluster listens on PORT+2(i-1) and CONTROLLER_PORT+2(i-1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
KHOME="${TRAINWATCH_KAFKA_HOME:-$HOME/.cache/trainwatch/kafka}"
LIBS="${TRAINWATCH_KAFKA_LIBS:-$KHOME/libs}"   # jars are shared by every instance
PORT="${TRAINWATCH_KAFKA_PORT:-9092}"
CPORT="${TRAINWATCH_KAFKA_CONTROLLER_PORT:-9093}"
OWNER="${TRAINWATCH_KAFKA_OWNER:-user}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
READY_TIMEOUT=120  # seconds for cold JVMs + KRaft election + first produce/consume
STOP_TIMEOUT=30    # seconds of graceful (TERM) shutdown before KILL
BROKERS=1
FORCE=0

log() { echo "kafka.sh: $*" >&2; }

# Per-instance state: a single node lives in broker-$PORT (as before), a cluster in cluster-$PORT/node-$i. Each
# node has its own pid file, data and logs, so instances on other ports (or homes) never share anything.
inst_dir() { if ((BROKERS == 1)); then echo "$KHOME/broker-$PORT"; else echo "$KHOME/cluster-$PORT"; fi; }
node_dir() { if ((BROKERS == 1)); then inst_dir; else echo "$(inst_dir)/node-$1"; fi; }
node_port() { echo $((PORT + 2 * ($1 - 1))); }
node_cport() { echo $((CPORT + 2 * ($1 - 1))); }
bootstrap() {
  local i out=""
  for ((i = 1; i <= BROKERS; i++)); do out+="${out:+,}127.0.0.1:$(node_port "$i")"; done
  echo "$out"
}

# A pid file can outlive its process (kill -9, reboot, CI cleanup) and the pid can be reused:
# only trust it if that pid is alive and really is a kafka.Kafka running THIS node's config.
running_pid() {
  local dir=$1 pid
  [[ -f "$dir/kafka.pid" ]] || return 1
  pid="$(cat "$dir/kafka.pid")"
  [[ -n "$pid" ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka\.Kafka $dir/server.properties" || return 1
  echo "$pid"
}

# kill -0 also succeeds on a zombie (a broker that died while still our child in `start`), so look at its state.
alive() { local st; st="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ "$st" != Z* ]]; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Resolve jars once; the stamp (hash of the pom) makes an edited pom trigger a fresh resolution.
resolve_jars() {
  local want; want="$(sha256sum "$HERE/pom.xml" | cut -d' ' -f1)"
  if [[ -f "$LIBS/.pom.sha256" && "$(cat "$LIBS/.pom.sha256")" == "$want" ]] && ls "$LIBS"/kafka_2.13-*.jar >/dev/null 2>&1; then
    return 0
  fi
  log "resolving Kafka jars with Maven into $LIBS (first run only)..."
  local t0=$SECONDS tmp="$LIBS.tmp"
  rm -rf "$tmp"
  mkdir -p "$KHOME"
  # Output goes to a file: Maven 3.8 -q still prints stray colour codes, and the full log helps on failure.
  mvn -B -f "$HERE/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
    >"$KHOME/mvn.log" 2>&1 || { tail -n 40 "$KHOME/mvn.log" >&2; log "Maven failed; full log: $KHOME/mvn.log"; return 1; }
  rm -rf "$LIBS" && mv "$tmp" "$LIBS"   # swap in whole, so an interrupted download never looks complete
  echo "$want" >"$LIBS/.pom.sha256"
  log "jars resolved in $((SECONDS - t0))s"
}

write_config() {
  local i=$1 dir; dir="$(node_dir "$i")"
  local p c; p="$(node_port "$i")"; c="$(node_cport "$i")"
  mkdir -p "$dir/data" "$dir/logs"
  local rf=1 isr=1 quorum
  if ((BROKERS == 1)); then
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:$CPORT"
  else
    rf=$((BROKERS < 3 ? BROKERS : 3)); isr=$((rf > 1 ? 2 : 1))
    # A static voter set: every node is a controller voter from the first format on (no dynamic quorum changes).
    local j voters=""
    for ((j = 1; j <= BROKERS; j++)); do voters+="${voters:+,}$j@127.0.0.1:$(node_cport "$j")"; done
    quorum="controller.quorum.voters=$voters"
  fi
  # Internal topics must be satisfiable with the nodes there are, or the broker never becomes usable.
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$i
$quorum
listeners=PLAINTEXT://127.0.0.1:$p,CONTROLLER://127.0.0.1:$c
advertised.listeners=PLAINTEXT://127.0.0.1:$p,CONTROLLER://127.0.0.1:$c
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
# Topics are provisioned (trainwatch topics create, test fixtures), never guessed: an auto-created input gets
# the broker's partition count, not the pipeline's, and breaks co-partitioning for good.
auto.create.topics.enable=false
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
unclean.leader.election.enable=false
# Tests create many short-lived consumer groups: don't wait 3 s for more members before the first assignment.
group.initial.rebalance.delay.ms=0
EOF
  # Kafka ships no logging backend in the jars (the pom adds log4j2); send everything to a rolling file.
  cat >"$dir/log4j2.properties" <<'EOF'
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
EOF
}

# KRaft storage must be formatted once with a cluster id (shared by every node of a cluster); keep the id so
# restarts reuse the same data.
format_storage() {
  local i=$1 dir; dir="$(node_dir "$i")"
  local cp="$LIBS/*" idfile; idfile="$(inst_dir)/cluster-id"
  [[ -s "$idfile" ]] || java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 >"$idfile"
  local mode=(--standalone)
  ((BROKERS == 1)) || mode=()
  java -Dkafka.logs.dir="$dir/logs" -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$cp" \
    kafka.tools.StorageTool format -t "$(cat "$idfile")" -c "$dir/server.properties" \
    "${mode[@]}" --ignore-formatted >"$dir/logs/format.log" 2>&1 || { cat "$dir/logs/format.log" >&2; return 1; }
}

# Readiness = a real produce (acks=all) + consume (with a consumer group, so the group coordinator is up too) on
# a health topic created here with one replica per node (auto-creation is off). An open port alone only says the
# socket listens, not that the controllers elected a leader and topics work.
roundtrip() {
  local budget=$1
  "$PYTHON" - "$(bootstrap)" "$budget" "$((BROKERS < 3 ? BROKERS : 3))" <<'PY'
import logging, sys, time, uuid
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
bootstrap, deadline, rf = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
topic, token = "__trainwatch_health", uuid.uuid4().hex
quiet = logging.getLogger("quiet"); quiet.addHandler(logging.NullHandler()); quiet.propagate = False
admin = AdminClient({"bootstrap.servers": bootstrap, "logger": quiet})
try:
    admin.create_topics([NewTopic(topic, 1, rf)], request_timeout=15)[topic].result(20)
except KafkaException as exc:
    if "TOPIC_ALREADY_EXISTS" not in str(exc):
        sys.exit(f"health topic: {exc}")
p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000, "acks": "all", "logger": quiet})
p.produce(topic, value=token.encode())
if p.flush(15) != 0:
    sys.exit("produce not delivered")
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "trainwatch-health-" + token, "logger": quiet,
              "auto.offset.reset": "earliest", "enable.auto.commit": False})
c.subscribe([topic])
try:
    while time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error() and m.value() == token.encode():
            sys.exit(0)
    sys.exit("message not consumed back before the deadline")
finally:
    c.close()
PY
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT)) can_roundtrip=1 i dir pid
  if ! "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    can_roundtrip=0
    log "WARNING: confluent_kafka not importable with $PYTHON; readiness = ports open only (set PYTHON=...)"
  fi
  local hlog; hlog="$(node_dir 1)/logs/health.log"
  while ((SECONDS < deadline)); do
    local up=1
    for ((i = 1; i <= BROKERS; i++)); do
      dir="$(node_dir "$i")"
      if [[ -f "$dir/kafka.pid" ]] && pid="$(cat "$dir/kafka.pid")" && ! alive "$pid"; then
        log "node $i exited during startup; last log lines:"
        tail -n 40 "$dir/logs/server.log" "$dir/logs/stdout.log" >&2 2>/dev/null
        return 1
      fi
      port_open "$(node_port "$i")" || up=0
    done
    if ((up)); then
      ((can_roundtrip)) || return 0
      roundtrip "$((deadline - SECONDS))" 2>>"$hlog" && return 0
    fi
    sleep 1
  done
  log "not ready after ${READY_TIMEOUT}s; see $(inst_dir)/**/server.log"
  return 1
}

# Start every node of this instance that is not running. Nodes already running (ours) are kept: `start` after a
# node was killed restarts just that node.
start() {
  local i dir pid p c launched=0 t0=$SECONDS
  mkdir -p "$(inst_dir)"
  for ((i = 1; i <= BROKERS; i++)); do
    dir="$(node_dir "$i")"
    pid="$(running_pid "$dir")" && continue
    p="$(node_port "$i")"; c="$(node_cport "$i")"
    if port_open "$p" || port_open "$c"; then
      if ((BROKERS == 1)) && port_open "$p" && ((launched == 0)); then
        # Someone else's broker (another home, another script): use it, never touch it, claim nothing.
        log "a broker this home did not start is listening on 127.0.0.1:$p; leaving it alone (stop will not touch it)"
        return 0
      fi
      log "port $p or $c is already in use by another process"; return 1
    fi
    if ((launched == 0)); then resolve_jars; fi
    write_config "$i"
    format_storage "$i"
    # nohup + redirected stdio: the broker must outlive this shell and must not hold a caller's pipe open
    # (e.g. pytest capturing our output would otherwise wait for EOF forever).
    local heap=512m; ((BROKERS == 1)) || heap=384m
    nohup java "-Xmx$heap" -Dkafka.logs.dir="$dir/logs" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
      -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" </dev/null >"$dir/logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"
    # Ownership goes with the instance: a restarted node keeps the owner of the cluster it rejoins.
    [[ -s "$(inst_dir)/owner" ]] || echo "$OWNER" >"$(inst_dir)/owner"
    launched=$((launched + 1))
  done
  if ((launched == 0)); then
    log "already running ($(bootstrap), started by $(cat "$(inst_dir)/owner" 2>/dev/null || echo unknown))"
    return 0
  fi
  if ! wait_ready; then FORCE=1 stop; return 1; fi
  log "started $launched node(s) on $(bootstrap) in $((SECONDS - t0))s; logs under $(inst_dir)"
}

stop_pid() {
  local pid=$1 deadline=$((SECONDS + STOP_TIMEOUT))
  kill -TERM "$pid"
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
  if alive "$pid"; then
    log "pid $pid: no exit after ${STOP_TIMEOUT}s of TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while alive "$pid"; do ((SECONDS < deadline)) || { log "pid $pid survived KILL"; return 1; }; sleep 0.2; done
  fi
}

count_nodes() { if [[ -d "$KHOME/cluster-$PORT" ]]; then find "$KHOME/cluster-$PORT" -maxdepth 1 -name 'node-*' | wc -l; else echo 0; fi; }

# Stop the nodes of this port's instances (single and cluster) that this home started, if the owner matches.
stop() {
  local b any=0 i dir pid owner
  for b in 1 0; do  # 1: the single node; 0: a cluster of however many nodes its directory holds
    if ((b == 1)); then BROKERS=1; else
      BROKERS="$(count_nodes)"
      ((BROKERS > 1)) || continue
    fi
    local pids=() nodes=()
    for ((i = 1; i <= BROKERS; i++)); do
      dir="$(node_dir "$i")"
      if pid="$(running_pid "$dir")"; then pids+=("$pid"); nodes+=("$dir"); else rm -f "$dir/kafka.pid"; fi
    done
    ((${#pids[@]})) || continue
    any=1
    owner="$(cat "$(inst_dir)/owner" 2>/dev/null || echo user)"   # no owner file: started by a pre-owner kafka.sh
    if [[ "$owner" != "$OWNER" ]] && ((FORCE == 0)); then
      log "$(bootstrap) was started by owner '$owner', not '$OWNER': leaving it running (stop --force stops it)"
      continue
    fi
    for pid in "${pids[@]}"; do stop_pid "$pid" & done
    wait
    for dir in "${nodes[@]}"; do rm -f "$dir/kafka.pid"; done
    rm -f "$(inst_dir)/owner"
    log "stopped ${#pids[@]} node(s) (pids ${pids[*]}) of $(bootstrap)"
  done
  ((any)) || log "nothing this home started is running on port $PORT"
  return 0
}

status() {
  local b i dir pid found=0
  for b in 1 0; do
    if ((b == 1)); then BROKERS=1; else
      BROKERS="$(count_nodes)"
      ((BROKERS > 1)) || continue
    fi
    for ((i = 1; i <= BROKERS; i++)); do
      dir="$(node_dir "$i")"
      if pid="$(running_pid "$dir")"; then
        echo "running node $i (pid $pid) on 127.0.0.1:$(node_port "$i"), owner $(cat "$(inst_dir)/owner" 2>/dev/null || echo user); pidfile $dir/kafka.pid"
        found=1
      elif ((b == 0)); then
        echo "stopped node $i (127.0.0.1:$(node_port "$i")); pidfile $dir/kafka.pid"
      fi
    done
  done
  ((found)) || { echo "not running (nothing this home started on 127.0.0.1:$PORT)"; return 1; }
}

cmd="${1:-}"; shift || true
while (($#)); do
  case "$1" in
    --brokers) BROKERS="${2:?--brokers N}"; shift 2 ;;
    --force) FORCE=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ "$BROKERS" =~ ^[1-9]$ ]] || { echo "--brokers: 1..9" >&2; exit 2; }
case "$cmd" in
  start | stop | status) "$cmd" ;;
  *) echo "usage: $0 start [--brokers N] | stop [--force] | status" >&2; exit 2 ;;
esac
