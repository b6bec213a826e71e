#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft: broker and controller in one JVM), run straight from Maven Central
# jars so that developers and CI need only Java 17+ and Maven — no tarball download, no Docker.
#
#   deploy/local/kafka.sh start|stop|status
#
# Env: TRAINWATCH_KAFKA_HOME (jar cache + state, default ~/.cache/trainwatch/kafka),
#      TRAINWATCH_KAFKA_PORT (9092), TRAINWATCH_KAFKA_CONTROLLER_PORT (9093),
#      PYTHON (interpreter with confluent_kafka for the readiness check; default: the repo's .venv, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
KHOME="${TRAINWATCH_KAFKA_HOME:-$HOME/.cache/trainwatch/kafka}"
PORT="${TRAINWATCH_KAFKA_PORT:-9092}"
CPORT="${TRAINWATCH_KAFKA_CONTROLLER_PORT:-9093}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
READY_TIMEOUT=90   # seconds for a cold JVM + KRaft election + first produce/consume
STOP_TIMEOUT=30    # seconds of graceful (TERM) shutdown before KILL

LIBS="$KHOME/libs"            # jars are shared by every instance
INST="$KHOME/broker-$PORT"    # per-port state, so a second broker on another port never shares a data dir
PIDFILE="$INST/kafka.pid"
LOGDIR="$INST/logs"

log() { echo "kafka.sh: $*" >&2; }

# A pid file can outlive its process (kill -9, reboot, CI cleanup) and the pid can be reused:
# only trust it if that pid is alive and really is our kafka.Kafka.
running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid; pid="$(cat "$PIDFILE")"
  [[ -n "$pid" ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
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
  local t0=$SECONDS tmp="$KHOME/libs.tmp"
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
  mkdir -p "$INST/data" "$LOGDIR"
  # Single node: every internal topic must be satisfiable with one replica or the broker never becomes usable.
  cat >"$INST/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$INST/data
num.partitions=4
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests create many short-lived consumer groups: don't wait 3 s for more members before the first assignment.
group.initial.rebalance.delay.ms=0
EOF
  # Kafka ships no logging backend in the jars (the pom adds log4j2); send everything to a rolling file.
  cat >"$INST/log4j2.properties" <<'EOF'
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

# KRaft storage must be formatted once with a cluster id; keep the id so restarts reuse the same data.
format_storage() {
  local cp="$LIBS/*"
  [[ -s "$INST/cluster-id" ]] || java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 >"$INST/cluster-id"
  java -Dkafka.logs.dir="$LOGDIR" -Dlog4j2.configurationFile="$INST/log4j2.properties" -cp "$cp" \
    kafka.tools.StorageTool format -t "$(cat "$INST/cluster-id")" -c "$INST/server.properties" \
    --standalone --ignore-formatted >"$LOGDIR/format.log" 2>&1 || { cat "$LOGDIR/format.log" >&2; return 1; }
}

# Readiness = a real produce + consume (with a consumer group, so the group coordinator is up too).
# An open port alone only says the socket listens, not that the controller elected itself and topics work.
roundtrip() {
  local budget=$1
  "$PYTHON" - "127.0.0.1:$PORT" "$budget" <<'PY'
import sys, time, uuid
from confluent_kafka import Consumer, Producer
bootstrap, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
topic, token = "__trainwatch_health", uuid.uuid4().hex
p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000})
p.produce(topic, value=token.encode())
if p.flush(15) != 0:
    sys.exit("produce not delivered")
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "trainwatch-health-" + token,
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
  local pid=$1 deadline=$((SECONDS + READY_TIMEOUT)) can_roundtrip=1
  if ! "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    can_roundtrip=0
    log "WARNING: confluent_kafka not importable with $PYTHON; readiness = port $PORT open only (set PYTHON=...)"
  fi
  while ((SECONDS < deadline)); do
    alive "$pid" || { log "broker exited during startup; last log lines:"; tail -n 40 "$LOGDIR/server.log" "$LOGDIR/stdout.log" >&2 2>/dev/null; return 1; }
    if port_open "$PORT"; then
      ((can_roundtrip)) || return 0
      roundtrip "$((deadline - SECONDS))" 2>>"$LOGDIR/health.log" && return 0
    fi
    sleep 1
  done
  log "broker not ready after ${READY_TIMEOUT}s; see $LOGDIR/server.log"
  return 1
}

start() {
  local pid
  if pid="$(running_pid)"; then log "already running (pid $pid, 127.0.0.1:$PORT)"; return 0; fi
  # Something else on the port would make our broker die at bind time with a less obvious message.
  if port_open "$PORT" || port_open "$CPORT"; then log "port $PORT or $CPORT is already in use by another process"; return 1; fi
  resolve_jars
  write_config
  format_storage
  local t0=$SECONDS
  # nohup + redirected stdio: the broker must outlive this shell and must not hold a caller's pipe open
  # (e.g. pytest capturing our output would otherwise wait for EOF forever).
  nohup java -Xmx512m -Dkafka.logs.dir="$LOGDIR" -Dlog4j2.configurationFile="$INST/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$INST/server.properties" </dev/null >"$LOGDIR/stdout.log" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDFILE"
  if ! wait_ready "$pid"; then stop; return 1; fi
  log "started (pid $pid) on 127.0.0.1:$PORT in $((SECONDS - t0))s; log: $LOGDIR/server.log"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then log "not running"; rm -f "$PIDFILE"; return 0; fi
  kill -TERM "$pid"
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
  if alive "$pid"; then
    log "no exit after ${STOP_TIMEOUT}s of TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while alive "$pid"; do ((SECONDS < deadline)) || { log "pid $pid survived KILL"; return 1; }; sleep 0.2; done
  fi
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running (pid $pid) on 127.0.0.1:$PORT; log: $LOGDIR/server.log"
  else
    echo "not running (127.0.0.1:$PORT)"; return 1
  fi
}

case "${1:-}" in
  start | stop | status) "$1" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
