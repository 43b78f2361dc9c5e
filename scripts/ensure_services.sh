#!/usr/bin/env bash
# Checks that PostgreSQL (127.0.0.1:5432) and RabbitMQ (127.0.0.1:5672) answer; starts
# them if they are installed but stopped; fails with a clear message otherwise.
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port name seconds
  for _ in $(seq "$3"); do answers "$1" && return 0; sleep 1; done
  echo "error: $2 did not come up on 127.0.0.1:$1 within $3 s" >&2
  return 1
}

if ! answers 5432; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    wait_for 5432 PostgreSQL 30
  else
    echo "error: PostgreSQL is not answering on 127.0.0.1:5432 and is not installed here" >&2
    exit 1
  fi
fi

if ! answers 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached
    wait_for 5672 RabbitMQ 90
  else
    echo "error: RabbitMQ is not answering on 127.0.0.1:5672 and is not installed here" >&2
    exit 1
  fi
fi

if ! command -v rabbitmqctl >/dev/null; then
  echo "error: rabbitmqctl is needed (tests create a RabbitMQ vhost each)" >&2
  exit 1
fi
echo "PostgreSQL and RabbitMQ are answering"
